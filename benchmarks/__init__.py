"""The benchmark of saliencycheck against Quantus and bare compute (`make bench`)."""
