"""The picture both training stages save next to their log: out/loss.png."""


def plot_loss(rows, path, title):
    """A loss curve drawn with Pillow: raw loss in light gray, a moving average in blue."""
    from PIL import Image, ImageDraw
    if len(rows) < 2:
        return
    W, H, m = 640, 360, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    lo, hi = 0.0, max(losses)
    x = lambda s: m + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (W - 2 * m)
    y = lambda v: H - m - (v - lo) / max(hi - lo, 1e-9) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline="black")
    for frac in (0, 0.25, 0.5, 0.75, 1):
        v = lo + frac * (hi - lo)
        d.line([m - 4, y(v), m, y(v)], fill="black")
        d.text((4, y(v) - 6), f"{v:.2f}", fill="black")
    d.line([(x(s), y(v)) for s, v in zip(steps, losses)], fill=(190, 190, 190))
    d.line([(x(s), y(v)) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
    d.text((m, 15), f"{title}: loss {smooth[0]:.3f} -> {smooth[-1]:.3f} over {steps[-1]} steps", fill="black")
    d.text((W // 2 - 10, H - m + 10), "step", fill="black")
    img.save(path)
