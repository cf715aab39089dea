"""Complex reasoning for the toy teacher (paper section 3, the third response type): one question per record that
needs a small inference from the boxes, answered step by step, then concluded, as GPT-4's reasoning answers are."""
import math

from .world import COLORS, NUMBER_WORDS, count, join_words


def the_list(objs):  # "the red circle, the blue square and the green diamond"
    return join_words([f"the {o.name}" for o in objs])


def r_remove(objs, rng):
    o, n = rng.choice(objs), len(objs)
    rest = [x for x in objs if x is not o]
    left = f"leaves {the_list(rest)}" if rest else "leaves only the background"
    return (f"If the {o.name} were removed, how many shapes would remain?",
            f"The image contains {count(n, 'shape')}: {the_list(objs)}. Removing the {o.name} {left}. "
            f"So {count(n - 1, 'shape')} would remain.")


# Distance from a shape's centre to a corner or an edge of the image (normalized units).
NEAREST = {
    "top-left corner": lambda o: math.hypot(o.cx, o.cy), "top-right corner": lambda o: math.hypot(1 - o.cx, o.cy),
    "bottom-left corner": lambda o: math.hypot(o.cx, 1 - o.cy), "bottom-right corner": lambda o: math.hypot(1 - o.cx, 1 - o.cy),
    "top edge": lambda o: o.cy, "bottom edge": lambda o: 1 - o.cy, "left edge": lambda o: o.cx, "right edge": lambda o: 1 - o.cx,
}


def r_nearest(objs, rng):
    target = rng.choice(list(NEAREST))
    ranked = sorted(objs, key=NEAREST[target])
    if len(objs) < 2 or NEAREST[target](ranked[1]) - NEAREST[target](ranked[0]) < 0.1:  # clear winners only
        return None
    places = "; ".join(f"the {o.name} is {o.where}" for o in objs)
    return (f"Which shape is closest to the {target} of the image?",
            f"Look at where each shape is: {places}. Of these, the {ranked[0].name} lies nearest to the "
            f"{target}. So the {ranked[0].name} is closest to the {target}.")


def r_round(objs, rng):
    round_ = [o for o in objs if o.shape == "circle"]
    angular = [o for o in objs if o.shape != "circle"]
    r, a = len(round_), len(angular)
    group = lambda g, noun: count(len(g), noun) + (f" ({the_list(g)})" if g else "")
    if r > a:
        end = f"{NUMBER_WORDS[r].capitalize()} is more than {NUMBER_WORDS[a]}, so yes, there are more round shapes than angular ones."
    elif r == a:
        end = f"Both numbers are {NUMBER_WORDS[r]}, so no, there are as many round shapes as angular ones."
    else:
        end = f"{NUMBER_WORDS[r].capitalize()} is fewer than {NUMBER_WORDS[a]}, so no, there are fewer round shapes than angular ones."
    return ("Are there more round shapes than angular ones?",
            "Circles are round, while squares, triangles and diamonds have corners, so they are angular. "
            f"The image has {group(round_, 'round shape')} and {group(angular, 'angular shape')}. {end}")


def r_larger(objs, rng):
    large = [o for o in objs if o.size == "large"]
    small = [o for o in objs if o.size == "small"]
    if not large or not small:
        return None
    big, little = rng.choice(large), rng.choice(small)
    first, second = (big, little) if rng.random() < 0.5 else (little, big)
    return (f"Which is larger, the {first.name} or the {second.name}?",
            f"The {big.name} {big.where} is a large shape, while the {little.name} {little.where} is a small one. "
            f"So the {big.name} is larger.")


def r_colors(objs, rng):
    if len(objs) < 2:
        return None
    colors = [c for c in COLORS if any(o.color == c for o in objs)]
    k = len(colors)
    end = f"So the shapes have {count(k, 'different color')}." if k > 1 else "So all the shapes have the same color."
    return ("How many different colors do the shapes in the image have?",
            f"The shapes are {the_list(objs)}. Their colors are {join_words(colors)}. {end}"
            if k > 1 else f"The shapes are {the_list(objs)}. Each of them is {colors[0]}. {end}")


REASONING = [r_remove, r_nearest, r_round, r_larger, r_colors]


def reason(objs, rng):
    for make in rng.sample(REASONING, len(REASONING)):  # r_remove and r_round always apply
        qa = make(objs, rng)
        if qa is not None:
            return qa
