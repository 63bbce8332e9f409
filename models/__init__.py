"""Pure PyTorch networks for Transfigure: generators, discriminators, DCGAN, classifier and weight init.

Import submodules directly (e.g. ``from transfigure.models.generators import build_generator``); nothing is
imported here so that each module stays cheap to load on its own.
"""
