"""Training data: tokenizers (tokenizers.py), the corpus and its split (corpus.py), prepared
directories made by `avatarl prepare` (sources.py -> prepare.py -> prepared.py), and the windows drawn
for training and validation (sampler.py)."""
