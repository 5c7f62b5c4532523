"""Run a recipe: ``python tools/train.py recipes/digits.yaml [--set key=value ...] [--resume]``
(the same as ``qat train``)."""
import argparse

from qat.train import run_recipe

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument('recipe', help='YAML recipe file')
parser.add_argument('--set', dest='overrides', action='append', default=[],
                    metavar='KEY=VALUE', help='override a recipe key, e.g. qat.epochs=5')
parser.add_argument('--resume', action='store_true', help="continue the run's last checkpoint")
args = parser.parse_args()
run_recipe(args.recipe, args.overrides, resume=args.resume)
