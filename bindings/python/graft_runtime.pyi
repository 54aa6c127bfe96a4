"""Run graft artifacts (transfer-learned image classifiers) from Python."""
import os
from typing import List, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, "os.PathLike[str]"]

class GraftError(Exception):
    """An artifact or image could not be loaded or run; the message names the file."""

class Model:
    """A graft artifact, memory-mapped and ready to classify. Safe to share between threads."""

    def __init__(self, path: _Path) -> None: ...
    @property
    def labels(self) -> List[str]:
        """Class names, in the order of the model's outputs."""
    @property
    def input_size(self) -> Tuple[int, int]:
        """(height, width) every image is resized and centre-cropped to."""
    @overload
    def predict(self, images: _Path, top_k: int = 5) -> List[Tuple[str, float]]: ...
    @overload
    def predict(
        self, images: Sequence[_Path], top_k: int = 5
    ) -> List[List[Tuple[str, float]]]: ...
    def predict_array(
        self, array: npt.NDArray[np.uint8], top_k: int = 5, bgr: bool = False
    ) -> List[Tuple[str, float]]:
        """Top-k (label, probability) of an HxWx3 RGB (BGR with bgr=True), HxWx4 RGBA or HxW
        gray uint8 array, with the artifact's preprocessing."""
    def logits(
        self, image: Union[_Path, npt.NDArray[np.uint8]], bgr: bool = False
    ) -> npt.NDArray[np.float32]:
        """Raw scores before the softmax, one per label."""
