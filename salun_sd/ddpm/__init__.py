"""Class-conditional DDPM with classifier-free guidance (the paper's CIFAR-10 setting), on the SalUn core.

`model` builds the UNet, `data` loads CIFAR-10 or scikit-learn's digits, `train` does base training and
Retrain, `forget` runs the core saliency mask and masked unlearning, `sample` draws guided samples, and
`classifier` + `evaluate` score unlearning accuracy, remaining-class accuracy and FID.
"""
