"""``python -m mmtrain.train [overrides]`` (also under torchrun): the same as ``mmtrain train``."""
import sys

from mmtrain.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
