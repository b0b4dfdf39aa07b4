"""Makes launch/samples/: ten real MNIST test digits plus "photographed" and "drawn" ones.

Run from the repo root: python launch/samples/make_samples.py DATA_DIR
"""
import numpy as np
from PIL import Image, ImageFilter
from distributed.data import read_mnist
import sys
imgs, digits = read_mnist(sys.argv[1] if len(sys.argv) > 1 else "data", train=False)
imgs, digits = imgs.numpy(), digits.numpy()
out = "launch/samples"
for d in range(10):
    i = int(np.nonzero(digits == d)[0][0])
    Image.fromarray(imgs[i], mode="L").save(f"{out}/mnist_{d}.png", optimize=True)
rng = np.random.default_rng(0)
# photographed: dark ink on uneven grey paper, big, blurred, JPEG
for d, i in ((3, int(np.nonzero(digits == 3)[0][5])), (7, int(np.nonzero(digits == 7)[0][5]))):
    ink = np.asarray(Image.fromarray(imgs[i]).resize((160, 160), Image.BICUBIC), dtype=np.float32) / 255
    paper = 0.75 + 0.15 * np.linspace(0, 1, 200)[None, :] + rng.normal(0, 0.02, (200, 200))
    page = paper.copy(); page[25:185, 15:175] *= (1 - 0.85 * ink)
    rgb = np.stack([page * 1.0, page * 0.97, page * 0.9], -1)
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)).save(
        f"{out}/photo_{d}.jpg", quality=80)
# drawn: black strokes on a transparent canvas, as a drawing app exports them
i = int(np.nonzero(digits == 5)[0][3])
alpha = np.asarray(Image.fromarray(imgs[i]).resize((96, 96), Image.BICUBIC))
rgba = np.zeros((120, 120, 4), np.uint8); rgba[10:106, 14:110, 3] = alpha
Image.fromarray(rgba, mode="RGBA").save(f"{out}/drawn_5.png", optimize=True)
