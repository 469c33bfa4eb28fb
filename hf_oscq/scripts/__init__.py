"""Recipe support, not public API: the data sets, the paper's models, the recipe runner shared by recipes/ and bench/,
launch checks and the toy model. Importing hf_oscq never imports these (datasets, torchvision and timm stay
unloaded until a recipe runs)."""
