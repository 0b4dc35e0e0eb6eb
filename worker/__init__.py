"""The engine: model code and loaders, paged KV cache, radix prefix cache, scheduler, sampler, runner."""
