"""Graph passes over ``torch.export`` programs that split a memory-augmented model into a static
anchor graph and a memory slot.  One pass per module; :mod:`hm_export.passes.pipeline` composes them."""
