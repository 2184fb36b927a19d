"""DataLens's utility measure: a classifier trained only on generated samples, tested on the real test set.

The classifier follows the official MNIST evaluation (AI-secure/DataLens ``evaluation/train-classifier-mnist.py``):
3x3 conv 32 + ReLU, 2x2 max-pool, dropout 0.2, 3x3 conv 64 + ReLU, dropout 0.25, dense 64 + ReLU, dense to the
classes. It trains with graspext's trainer (SGD with momentum and step decay).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from graspext.datalens.config import EvaluationConfig


class EvaluationCNN(nn.Module):
    def __init__(self, classes: int = 10, channels: int = 1, image_size: int = 28):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 for two 3x3 convolutions and a 2x2 pool, got {image_size}")
        side = (image_size - 2) // 2 - 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Dropout(0.25), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(64 * side * side, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def utility(train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor,
            config: EvaluationConfig | None = None, out_dir: str | None = None, progress: bool = False) -> dict:
    """Trains :class:`EvaluationCNN` on ``(train_images, train_labels)`` (the generated samples) and returns
    its best and final accuracy on the real ``(test_images, test_labels)``, with the per-epoch history."""
    from graspext.train import train

    config = config or EvaluationConfig()
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"generated images {tuple(train_images.shape[1:])} and test images "
                         f"{tuple(test_images.shape[1:])} differ in shape")
    torch.manual_seed(config.seed)
    model = EvaluationCNN(channels=train_images.shape[1], image_size=train_images.shape[-1])
    g = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(TensorDataset(train_images, train_labels), batch_size=config.batch_size, shuffle=True,
                              generator=g)
    test_loader = DataLoader(TensorDataset(test_images, test_labels), batch_size=512)
    result = train(model, train_loader, test_loader, epochs=config.epochs, lr=config.lr, weight_decay=5e-4,
                   seed=config.seed, out_dir=out_dir, progress=progress)
    return {"best_test_acc": result.best_test_acc, "final_test_acc": result.final_test_acc,
            "history": result.history}


__all__ = ["EvaluationCNN", "utility"]
