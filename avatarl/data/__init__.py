"""Training data: the corpus and its split (corpus.py), its vocabulary (vocab.py), and the windows drawn
from it for training and validation (sampler.py)."""
