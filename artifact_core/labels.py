"""Label meaning, the one place it is defined (torch-free: scoring's actors read it too).

File names of training folders carry these digits: ``image_<idx>_<label>.<ext>``.
"""

ARTIFACT = 0
CLEAN = 1
LABEL_NAMES = {ARTIFACT: "artifact", CLEAN: "artifact-free"}
