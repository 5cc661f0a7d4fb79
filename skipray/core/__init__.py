"""The skip-decoding core: pure torch over token ids, no Ray, no HTTP, no tokenizer.

``schedule`` (which layers run at each generation step; pure Python), ``cache`` (the preallocated KV
cache written by slot), ``architectures`` (one small adapter class per model family), ``model`` (the one
forward for prefill, decode and training), ``kernels`` (prepacked linears), ``sampling`` (the batched
sampler), ``requests`` (``SamplingParams``, completions, events), ``scheduler`` (admit, plan, retire;
plain Python), ``runner`` (the forward passes over cache rows), ``engine`` (add_request / step, and
``generate`` / ``stream`` on top), ``memory`` (KV-cache sizes under a schedule).
"""
