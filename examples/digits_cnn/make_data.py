"""Write scikit-learn's 8x8 digits as the .npz a user brings: x of (N, 8, 8), y of (N,), and a held-out split.

    python examples/digits_cnn/make_data.py --out runs/digits-own

writes `digits.npz` (x, y: 1437 training images; x_test, y_test: 360 held out) and
`query.npy`, the first 8 held-out images as a (8, 8, 8) batch to send to a server,
with their labels in `query_labels.npy`.
"""
import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    digits = load_digits()
    x = digits.images.astype(np.float32)                       # (1797, 8, 8), values 0..16
    x, x_test, y, y_test = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                            stratify=digits.target)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "digits.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    np.save(args.out / "query.npy", x_test[:8])
    np.save(args.out / "query_labels.npy", y_test[:8])
    print(f"{args.out / 'digits.npz'}: x {x.shape}, x_test {x_test.shape}; {args.out / 'query.npy'}: {x_test[:8].shape}")


if __name__ == "__main__":
    main()
