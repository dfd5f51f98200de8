"""Find AI-generated face images with visible artifacts: a MobileNetV2 fine-tuned on Ray.

One module per concern; the README's "Library" section lists them all (``data``: folders,
labels, splits; ``images``: the one decoder; ``storage``: local paths and URIs; ``model``;
``train_loop`` and ``trainer``: training; ``tuning``: sweeps; ``predict`` and ``scoring``:
scoring; ``bundle``: the model folder; ...).
Importing this package does nothing else: no Ray, no logging set-up, no files.
"""

__version__ = "0.1.0"
