"""Find AI-generated face images with visible artifacts: a MobileNetV2 fine-tuned on Ray.

Modules: ``data`` (folders, labels, splits), ``images`` (the one decoder),
``transforms``, ``model``, ``metrics``, ``bundle`` (model folder IO), ``config``,
``train_loop`` (per-worker loop), ``trainer`` (driver, ``build_trainer``), ``tuning``,
``predict``, ``scoring``, ``plots``, ``raycluster``, ``demo_data``.
Importing this package does nothing else: no Ray, no logging set-up, no files.
"""

__version__ = "0.1.0"
