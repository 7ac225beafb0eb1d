"""cnn-exp: train, test and use the lab's CNNs. In Python: `model = cnn_exp.load("…/best.ckpt")`, then
`model.predict(["digit.png"])` gives class probabilities, `model.classes` their names (cnn_exp/predict.py)."""

from cnn_exp.predict import Predictor, load

__all__ = ["Predictor", "load"]
