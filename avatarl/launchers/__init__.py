"""Ways to start the trainer somewhere else: several processes under torchrun (torchrun.py), or a GPU
container on Modal (modal.py). Both pass stop signals on, so a stopped run exits 0 with a checkpoint."""
