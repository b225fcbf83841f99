"""A synthetic MIND-format dataset whose clicks follow users' latent interests.

Why it exists: the demo and the CPU tests need data that (a) is free to ship, (b) has a signal a
small model can learn in minutes (so the demo's AUC is clearly above 0.5), and (c) goes through
the very same reader as real MIND. So we write ``behaviors.tsv`` + ``news.tsv`` in MIND's layout.

The generative story (all draws from one ``numpy`` generator seeded by ``seed``, so the files are
byte-identical for the same parameters):
- items belong to a category (and a subcategory); titles and abstracts are drawn mostly from the
  category's vocabulary, so the text says what the item is about;
- each user has 1-3 interest categories with Dirichlet weights, and a pre-period history (MIND's
  history column) drawn mostly from those categories;
- each impression shows a user a mix of interest and random items; an item is clicked with
  probability ``0.1 + 0.6 * weight`` of its category for the user's interests, else 0.02; every
  impression has at least one click and one non-click, like MIND's training impressions.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

VERSION = 1
PARAMS_FILE = "synth.json"
CATEGORIES: dict[str, tuple[tuple[str, ...], str]] = {
    "sports": (("football", "soccer", "tennis"), "coach season playoff league striker quarterback match title "
               "injury transfer stadium victory defeat goal tournament champion referee roster draft"),
    "finance": (("markets", "banking", "crypto"), "stocks investors earnings inflation rates bank shares market "
                "dividend bonds revenue profit forecast economy trading fund merger"),
    "travel": (("europe", "beaches", "cities"), "flight hotel beach resort island passport itinerary cruise museum "
               "tour vacation airline destination luggage backpacking scenic"),
    "foodanddrink": (("recipes", "restaurants", "wine"), "recipe chef dinner baking pasta restaurant wine cheese "
                     "dessert flavor kitchen grill spicy vegan brunch menu"),
    "health": (("fitness", "nutrition", "medicine"), "workout diet vitamins doctor sleep heart protein cardio "
               "vaccine clinic therapy stress calories yoga wellness"),
    "autos": (("cars", "electric", "racing"), "engine sedan truck horsepower battery dealership mileage hybrid "
              "torque racing suspension recall pickup charging motor"),
    "music": (("pop", "rock", "jazz"), "album concert singer guitar tour chart band lyrics festival drummer vinyl "
              "playlist grammy acoustic melody"),
    "movies": (("reviews", "boxoffice", "streaming"), "film director trailer sequel actor premiere cinema studio "
               "blockbuster screenplay oscar cast franchise documentary"),
    "weather": (("storms", "forecast", "climate"), "storm rain snow forecast hurricane temperature flood drought "
                "wind heatwave tornado frost humidity radar"),
    "technology": (("gadgets", "software", "ai"), "smartphone software chip laptop startup app robot algorithm "
                   "cloud privacy browser processor gadget update"),
    "science": (("space", "biology", "physics"), "nasa planet telescope galaxy fossil genome quantum particle "
                "species orbit experiment asteroid laboratory molecule"),
    "lifestyle": (("home", "fashion", "pets"), "garden fashion puppy decor style wardrobe cleaning furniture "
                  "kitten makeover wedding hobby shopping cozy"),
}
GENERIC = ("new report shows why this week experts say big change latest update first look inside story "
           "people today how what could best").split()
START = datetime(2019, 11, 9)


def _text(rng: np.random.Generator, vocab: list[str], n: int, topical: float) -> str:
    words = [vocab[rng.integers(len(vocab))] if rng.random() < topical else GENERIC[rng.integers(len(GENERIC))]
             for _ in range(n)]
    return " ".join(words)


def generate(out_dir: str | Path, users: int, items: int, impressions: int, seed: int) -> tuple[Path, Path]:
    """Write ``behaviors.tsv`` and ``news.tsv`` into ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(CATEGORIES)[: min(len(CATEGORIES), max(2, items // 5))]
    n_cat = len(names)
    vocab = [CATEGORIES[c][1].split() for c in names]
    item_cat = rng.permutation(np.arange(items) % n_cat)  # balanced: every category has items
    order = np.argsort(item_cat, kind="stable")  # item positions grouped by category
    cat_len = np.bincount(item_cat, minlength=n_cat)
    cat_start = np.concatenate([[0], np.cumsum(cat_len)[:-1]])

    news_lines = []
    for i in range(items):
        c = int(item_cat[i])
        sub = CATEGORIES[names[c]][0][rng.integers(3)]
        title = _text(rng, vocab[c], int(rng.integers(5, 9)), 0.75).capitalize()
        abstract = _text(rng, vocab[c], int(rng.integers(12, 24)), 0.6).capitalize() + "."
        news_lines.append(f"N{i + 1}\t{names[c]}\t{sub}\t{title}\t{abstract}\t"
                          f"https://example.invalid/synthetic/N{i + 1}\t[]\t[]")

    def draw(cats: np.ndarray) -> np.ndarray:
        """One random item per category in ``cats``."""
        return order[cat_start[cats] + (rng.random(len(cats)) * cat_len[cats]).astype(np.int64)]

    interests, weights, history = [], [], []
    for _ in range(users):
        k = int(rng.integers(1, 4))
        cats = rng.choice(n_cat, size=min(k, n_cat), replace=False)
        interests.append(cats)
        weights.append(rng.dirichlet(np.ones(len(cats))))
        n_hist = int(rng.integers(2, 21))
        hc = np.where(rng.random(n_hist) < 0.85, cats[rng.choice(len(cats), size=n_hist, p=weights[-1])],
                      rng.integers(0, n_cat, size=n_hist))
        history.append(" ".join(f"N{j + 1}" for j in dict.fromkeys(draw(hc).tolist())))

    who = rng.integers(0, users, size=impressions)
    seconds = np.sort(rng.uniform(0, 6 * 86400, size=impressions))
    n_cands = rng.integers(8, 25, size=impressions)
    beh_lines = []
    for k in range(impressions):
        u = int(who[k])
        cats, w = interests[u], weights[u]
        n = int(n_cands[k])
        n_int = max(1, n // 3)
        cc = np.concatenate([cats[rng.choice(len(cats), size=n_int, p=w)], rng.integers(0, n_cat, size=n - n_int)])
        cand = np.array(list(dict.fromkeys(draw(cc).tolist())))
        cat_w = np.zeros(n_cat)
        cat_w[cats] = w
        ccat = item_cat[cand]
        p = np.where(cat_w[ccat] > 0, 0.1 + 0.6 * cat_w[ccat], 0.02)
        click = rng.random(len(cand)) < p
        if not click.any():
            click[int(np.argmax(p))] = True
        if click.all() and len(cand) > 1:
            click[int(np.argmin(p))] = False
        when = (START + timedelta(seconds=float(seconds[k]))).strftime("%m/%d/%Y %I:%M:%S %p")
        imp = " ".join(f"N{i + 1}-{int(c)}" for i, c in zip(cand.tolist(), click.tolist(), strict=True))
        beh_lines.append(f"{k + 1}\tU{u + 1}\t{when}\t{history[u]}\t{imp}")

    behaviors, news = out / "behaviors.tsv", out / "news.tsv"
    for path, lines in ((news, news_lines), (behaviors, beh_lines)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return behaviors, news


def ensure(out_dir: str | Path, users: int, items: int, impressions: int, seed: int) -> tuple[Path, Path]:
    """Generate unless ``out_dir`` already holds a set made with exactly these parameters."""
    out = Path(out_dir)
    params = {"version": VERSION, "users": users, "items": items, "impressions": impressions, "seed": seed}
    marker = out / PARAMS_FILE
    behaviors, news = out / "behaviors.tsv", out / "news.tsv"
    if marker.is_file() and behaviors.is_file() and news.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return behaviors, news
        except ValueError:
            pass
    marker.unlink(missing_ok=True)  # a half-written set must never look complete
    generate(out, users, items, impressions, seed)
    marker.write_text(json.dumps(params, sort_keys=True))
    return behaviors, news
