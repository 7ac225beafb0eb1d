"""cnn-exp: train, test and use the lab's CNNs. In Python: `model = cnn_exp.load("…/best.ckpt")`, then
`model.predict(["digit.png"])` gives class probabilities, `model.classes` their names (cnn_exp/predict.py); a network
of your own: `cnn_exp.load(path, models=[MyNet])`."""

from pathlib import Path

from cnn_exp.predict import Predictor, load

# The project's config directory, conf/ beside this package (a checkout, or an editable install of one): an
# experiments repository's own train.py composes from it and adds its own configs (docs/extend.md).
CONF = str(Path(__file__).resolve().parent.parent / "conf")

__all__ = ["CONF", "Predictor", "load"]
