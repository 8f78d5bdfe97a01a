"""The Responsible Generative AI toolkit: policies, safety classifiers, the guard and SynthID Text.

Where it sits: rank 7, beside `eval`, after `infer` and `train`: it scores text with loaded Gemma
models and wraps generation; only the CLI and the server import it. Modules: `policy` (harm
policies as data), `classifier` (ShieldGemma-style Yes/No scoring), `guard` (input and output checks
around generation, fail-closed), `scoring` (precision, recall, AUC of a classifier), `watermark`
(SynthID Text processor and detectors).

Names are imported from their modules directly; importing this package loads nothing.
"""
