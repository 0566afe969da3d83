"""SalUn for image classification (the paper's other half) on the same saliency core as the diffusion side.

`data` splits the images and draws the forget set as the official code does, `model` is the CIFAR ResNet,
`train` the masked-SGD epoch loop, `forget` base training, Retrain, the mask and every unlearning method,
`evaluate` UA / RA / TA / MIA-efficacy and the average gap to Retrain, `commands` the `salun-sd classify` steps.
"""
