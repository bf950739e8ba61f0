"""vLLM glue: scheduler subclass, Model Runner V2 model state and sampler, config hook."""
