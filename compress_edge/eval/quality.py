"""Is a model worth keeping? Embedding spread, the teacher's similarity distribution, and the two
baselines a user thinks of first: plain cosine kNN on raw pixels, and the same network with random
weights.

One module, called by ``pretrain``, ``distill``, ``eval`` and the demo, so they all measure and warn
alike:

- :func:`embedding_spread`: mean pairwise cosine similarity and effective rank (RankMe: Garrido et
  al., "RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised Representations by
  Their Rank", ICML 2023) of L2-normalised embeddings; a collapsed model gives every image nearly the
  same embedding (mean cosine near 1, effective rank near 1) and its search scores say nothing.
- :func:`anchor_entropy`: how many anchors the teacher's softmax(sim / T) really spreads over; a
  distribution near uniform at the chosen temperature teaches the student nothing, one near one-hot
  teaches instance discrimination.
- :func:`raw_pixel_features` and :func:`random_weights_model`: the baselines.
- :func:`compare_with_baselines`: kNN of a model, its random-weights twin and raw pixels (and the
  teacher, when given) on a gallery and held-out queries, with warnings that say what to do.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from compress_edge.eval.neighbors import l2_normalize

log = logging.getLogger(__name__)

#: Above this mean pairwise cosine, or below this effective rank, embeddings count as collapsed. The
#: rank bound catches dimensional collapse, where images still differ but along a handful of
#: directions: the collapsed students measured so far (README, "Which method by default") used 2.8 and
#: 3.2 directions of 128 (weighted 20-NN 57 and 42 against 79 for the default method), while every
#: student that kept its teacher's neighbourhoods, on two data sets, used 5 or more.
COLLAPSE_MEAN_COSINE = 0.9
COLLAPSE_EFFECTIVE_RANK = 4.0
#: A narrow cone: all images within about 60 degrees of one another (mean cosine above 0.5) *and* along
#: fewer than 8 directions. Either alone is normal (a random network's features share a cone but use
#: many directions; a good student of ten classes uses about ten directions around the origin); both
#: together is collapse under way: compress-2q at 390 steps (mean cosine 0.79, rank 4.2: weighted
#: 20-NN 66 against raw pixels' 82), the shapes set's compress-2q (0.69, 5.6) and the textures' T = 0.02
#: student (0.68, 5.4: 42 % against its teacher's 76 %). One student that kept its teacher's
#: neighbourhoods falls inside it too: the shapes set's compress-2q at 130 epochs (0.52, 7.1: weighted
#: 20-NN 93.0, its teacher 93.8; README, "The paper's Table 1"). So a narrow cone alone is reported as a
#: likely collapse, to be checked with a kNN on labelled images, not as a collapse, and not reported
#: after a held-out kNN check that passed.
CONE_MEAN_COSINE = 0.5
CONE_EFFECTIVE_RANK = 8.0
#: The teacher's softmax over the anchors counts as near uniform when its perplexity covers more than
#: this share of them, and as near one-hot below this many anchors.
UNIFORM_SHARE = 0.5
ONE_HOT_ANCHORS = 1.5
#: Raw pixels are compared at most at this side (kNN on raw pixels barely changes with resolution).
RAW_PIXELS_MAX_SIDE = 64
#: A random network's batch-norm statistics are re-estimated on this many images.
RECALIBRATION_IMAGES = 1024
#: The two baselines every model is compared with, as named in the end-of-run check.
BASELINES = ("raw pixels", "same network, random weights")
#: What to do when a student does not beat raw pixels (the end-of-run check's default advice).
STUDENT_ADVICE = "train longer (more --epochs), use more images, or check the teacher"
#: A lead over a baseline smaller than this many standard errors (paired, over the same held-out
#: images) is reported as too small to tell: a SimCLR teacher at chance on 1,000 test images led raw
#: pixels by 6.7 points on its run's 60 held-out images (README, "The teacher's view, measured").
NOISE_STANDARD_ERRORS = 2.0
#: What to do when a held-out comparison is too close to call.
SCORE_ON_A_TEST_SET = ("score it on a labelled test set (compress-edge eval knn MODEL --train DATA --test TEST "
                       "--baselines)")


@dataclass
class Spread:
    """How spread out a set of embeddings is. mean_cosine: average cosine similarity of two different
    images; effective_rank: exp(entropy) of the normalised singular values (RankMe), between 1 and D."""

    mean_cosine: float
    effective_rank: float
    dim: int
    images: int

    @property
    def collapsed(self) -> bool:
        return self.fully_collapsed or self.narrow_cone

    @property
    def fully_collapsed(self) -> bool:
        """Past a collapse bound: nearly one embedding, or a handful of directions."""
        return self.mean_cosine > COLLAPSE_MEAN_COSINE or self.effective_rank < COLLAPSE_EFFECTIVE_RANK

    @property
    def narrow_cone(self) -> bool:
        """Inside the narrow-cone bound only: a likely collapse, which a kNN on labels confirms or not."""
        return (not self.fully_collapsed and self.mean_cosine > CONE_MEAN_COSINE
                and self.effective_rank < CONE_EFFECTIVE_RANK)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "collapsed": self.collapsed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spread:
        """The inverse of :meth:`to_dict` (a row of a :class:`Comparison`)."""
        return cls(d["mean_cosine"], d["effective_rank"], d["dim"], d["images"])

    def describe(self) -> str:
        return f"mean pairwise cosine {self.mean_cosine:.3f}, effective rank {self.effective_rank:.1f} of {self.dim}"


def _sample_rows(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(x) <= limit:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), size=limit, replace=False))]


def embedding_spread(embeddings: np.ndarray, *, max_images: int = 2000, seed: int = 0) -> Spread:
    """:class:`Spread` of (N, D) embeddings (normalised here), on at most ``max_images`` of them."""
    x = l2_normalize(_sample_rows(np.asarray(embeddings), max_images, seed))
    n, d = x.shape
    if n < 2:
        raise ValueError("embedding_spread needs at least two embeddings")
    total = x.sum(axis=0, dtype=np.float64)
    mean_cos = float((total @ total - n) / (n * (n - 1)))  # sum over pairs i != j of x_i . x_j
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / max(s.sum(), 1e-12)
    p = p[p > 0]
    rank = float(np.exp(-(p * np.log(p)).sum()))
    return Spread(mean_cosine=round(mean_cos, 4), effective_rank=round(rank, 2), dim=int(d), images=int(n))


def anchor_entropy(queries: np.ndarray, anchors: np.ndarray, temperature: float) -> dict[str, float]:
    """The perplexity exp(H) of softmax(q . anchors^T / T) for each query, averaged: how many anchors
    the distribution really covers. A query's own row (an anchor equal to it) is left out, as the
    loss leaves out an image's own anchors. Returns {"anchors", "effective", "share"}."""
    q, a = l2_normalize(queries), l2_normalize(anchors)
    logits = (q @ a.T).astype(np.float64) / float(temperature)
    logits[np.isclose(q @ a.T, 1.0, atol=1e-6)] = -np.inf  # the query itself
    logits[np.isneginf(logits).all(axis=1)] = 0.0  # every anchor equal to the query (a collapse): uniform
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    effective = float(np.exp(h).mean())
    return {"anchors": int(len(a)), "effective": round(effective, 1), "share": round(effective / len(a), 4)}


def temperature_warnings(entropy: dict[str, float], temperature: float, who: str = "the teacher") -> list[str]:
    """What to tell the user about a softmax over anchors (see :func:`anchor_entropy`)."""
    out = []
    if entropy["share"] > UNIFORM_SHARE:
        out.append(
            f"{who}'s similarity distribution at T = {temperature:g} is near uniform (it covers "
            f"{entropy['effective']:.0f} of {entropy['anchors']} anchors): the student would learn little; "
            f"lower --temperature (e.g. {temperature / 2:g}), or check that {who} gives distinct embeddings"
        )
    elif entropy["effective"] < ONE_HOT_ANCHORS:
        out.append(
            f"{who}'s similarity distribution at T = {temperature:g} is nearly one-hot ({entropy['effective']:.1f} "
            f"anchors): raise --temperature (e.g. {temperature * 2:g}) so the student learns neighbourhoods"
        )
    return out


def spread_warnings(spread: Spread, who: str, *, reference: Spread | None = None) -> list[str]:
    """A warning when ``who``'s embeddings have collapsed (and ``reference``'s, e.g. its teacher's, have not)."""
    if not spread.collapsed or (reference is not None and reference.collapsed):
        return []
    if spread.narrow_cone:
        return [
            f"{who}'s embeddings crowd into a narrow cone along few directions ({spread.describe()}), as "
            "collapsing students' did: check its kNN on labelled images (compress-edge eval knn ... --baselines) "
            "before deploying it; if it trails its teacher, train longer or with a lower --lr, or compare with "
            "--method regression-bn"
        ]
    return [
        f"{who}'s embeddings have nearly collapsed ({spread.describe()}): every image gets almost the "
        "same embedding and search scores say little; train longer or with a lower --lr, check the teacher, "
        "or compare with --method regression-bn"
    ]


# --------------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------------
def pixel_views(dataset, image_size: int, *, max_side: int = RAW_PIXELS_MAX_SIDE) -> np.ndarray:
    """Each image's evaluation view (shorter side to ``image_size``, centre crop; at most ``max_side``
    px) as plain pixels in [0, 1]: float32 (N, 3, S, S)."""
    from compress_edge.data.images import preprocess_eval

    side = min(int(image_size), int(max_side))
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return np.stack([preprocess_eval(dataset.get_image(i), side, zero, one) for i in range(len(dataset))])


def _luma(views: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) pixels -> (N, S, S): each pixel's luma (BT.601 weights)."""
    from compress_edge.models.spec import LUMA_WEIGHTS

    return np.einsum("c,nchw->nhw", np.asarray(LUMA_WEIGHTS, dtype=np.float32), views)


def pixel_features(views: np.ndarray, *, grey: bool = False) -> np.ndarray:
    """:func:`pixel_views` flattened and L2-normalised: (N, C * S * S). C is 3, or 1 when every image is
    gray (its three channels equal): the cosines are the same, and kNN and a linear probe cost a third.
    ``grey``: the luma of each pixel (C = 1), the pixels a ``grey_input`` model sees."""
    if grey:
        views = _luma(views)[:, None]
    elif len(views) and np.array_equal(views[:, 0], views[:, 1]) and np.array_equal(views[:, 0], views[:, 2]):
        views = views[:, :1]
    return l2_normalize(views.reshape(len(views), -1))


def raw_pixel_features(dataset, image_size: int, *, max_side: int = RAW_PIXELS_MAX_SIDE,
                       grey: bool = False) -> np.ndarray:
    """The raw-pixel baseline: :func:`pixel_features` of :func:`pixel_views`. Cosine kNN on these is the
    first baseline any model has to beat."""
    return pixel_features(pixel_views(dataset, image_size, max_side=max_side), grey=grey)


def model_pixels(dataset, spec) -> np.ndarray:
    """The raw-pixel baseline of the model of ``spec``: its images at its size, grey for a grey model."""
    from compress_edge.models.spec import is_grey_input

    return raw_pixel_features(dataset, spec.image_size, grey=is_grey_input(spec))


#: The colour check scores at most this many labelled images, each searched among the others.
COLOUR_CHECK_IMAGES = 5000
#: Bins a side of the colour check's chroma histogram (blue and red minus luma, each over [-0.9, 0.9]).
CHROMA_BINS = 8
#: Label shuffles that estimate the chance level of the chroma kNN.
CHANCE_SHUFFLES = 5


def chroma_features(views: np.ndarray) -> np.ndarray:
    """What each image's colours say without its shapes or brightness: the 2-D histogram of its pixels'
    chroma (blue minus luma, red minus luma), square-rooted and L2-normalised (Hellinger): (N, CHROMA_BINS**2)."""
    luma = _luma(views)
    blue, red = (views[:, 2] - luma).reshape(len(views), -1), (views[:, 0] - luma).reshape(len(views), -1)
    edges = np.linspace(-0.9, 0.9, CHROMA_BINS + 1)
    bins = (np.clip(np.digitize(blue, edges) - 1, 0, CHROMA_BINS - 1) * CHROMA_BINS
            + np.clip(np.digitize(red, edges) - 1, 0, CHROMA_BINS - 1))
    hist = np.stack([np.bincount(row, minlength=CHROMA_BINS**2) for row in bins]).astype(np.float32)
    return l2_normalize(np.sqrt(hist))


def _loo_hits(x: np.ndarray, y: np.ndarray, classes: int, k: int, device: str):
    """Whether each row's weighted k-NN vote among the other rows is right (bool (N,)), and the neighbours."""
    from compress_edge.eval.neighbors import exact_topk, knn_predict

    sims, idx = exact_topk(x, x, k, device=device, self_index=np.arange(len(x)))
    return knn_predict(sims, y[idx], classes, k=k).reshape(-1) == y, (sims, idx)


def colour_check(dataset, image_size: int, *, seed: int = 0, device: str = "cpu") -> dict[str, Any] | None:
    """Do the images' colours tell their classes apart? Two measures on the labelled images, each searched
    among the others by weighted 20-NN (at most COLOUR_CHECK_IMAGES, drawn with ``seed``; nothing is
    learnt, so every labelled image can be a query: about 2 points of noise on a few hundred images, where
    a 10 % hold-out would leave 6 to 7):

    - ``chroma``: the images' colours alone (:func:`chroma_features`: no shapes, no brightness) against
      chance (the same neighbours with the labels shuffled);
    - ``pixels``: raw pixels in grey against raw pixels in colour.

    ``grey`` is True when the colours say nothing of the class (chroma not above chance by
    NOISE_STANDARD_ERRORS standard errors) or mislead (grey pixels ahead by that much). There a
    self-supervised model trained on the colour images learns to tell images apart by their colours
    instead of their content: on the letters data set of the README, SimCLR on the colour images scored
    20.8 % weighted 20-NN, with the colours mixed away 70.9 %. None without labels, with fewer than
    HOLDOUT_MINIMUM labelled images, or for images that are grey already."""
    from compress_edge.data.datasets import SubsetDataset
    from compress_edge.eval.inputs import count_classes
    from compress_edge.eval.neighbors import knn_predict

    labels = np.asarray(dataset.labels) if dataset.has_labels else None
    if labels is None or len(labels) < HOLDOUT_MINIMUM or (labels < 0).any():
        return None
    n = min(len(labels), COLOUR_CHECK_IMAGES)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(labels), size=n, replace=False))
    views = pixel_views(SubsetDataset(f"{dataset.name} (colour check)", dataset, indices=picked), image_size)
    colour = pixel_features(views)
    if colour.shape[1] == views.shape[2] * views.shape[3]:  # one channel: every image is grey already
        return None
    y = labels[picked].astype(np.int64)
    classes, k = count_classes(y, y), min(20, n - 1)
    hits = {"colour": _loo_hits(colour, y, classes, k, device)[0],
            "grey": _loo_hits(pixel_features(views, grey=True), y, classes, k, device)[0]}
    d = hits["grey"].astype(np.float64) - hits["colour"].astype(np.float64)
    points, error = 100 * float(d.mean()), 100 * float(d.std(ddof=1)) / math.sqrt(n)
    mislead = points > 0 and points > NOISE_STANDARD_ERRORS * error
    chroma, (sims, idx) = _loo_hits(chroma_features(views), y, classes, k, device)
    shuffled = [rng.permutation(y) for _ in range(CHANCE_SHUFFLES)]
    chance = 100 * float(np.mean([(knn_predict(sims, s[idx], classes, k=k).reshape(-1) == s).mean() for s in shuffled]))
    accuracy = 100 * float(chroma.mean())
    chroma_error = 100 * math.sqrt(max(accuracy / 100 * (1 - accuracy / 100), 1 / n) / n)
    says_nothing = accuracy - chance <= NOISE_STANDARD_ERRORS * chroma_error
    return {"grey": bool(says_nothing or mislead),
            "chroma": {"knn20": round(accuracy, 2), "chance": round(chance, 2), "standard_error": round(chroma_error, 2),
                       "says_nothing": bool(says_nothing)},
            "pixels": {"colour_knn20": round(100 * float(hits["colour"].mean()), 2),
                       "grey_knn20": round(100 * float(hits["grey"].mean()), 2),
                       "grey_lead": {"points": round(points, 2), "standard_error": round(error, 2)},
                       "mislead": bool(mislead)},
            "images": n}


def random_weights_model(spec, dataset, *, seed: int = 0, images: int = RECALIBRATION_IMAGES):
    """The network of ``spec`` with random weights and its batch-norm statistics re-estimated on
    ``images`` images of ``dataset`` (with fresh statistics a random network's activations shrink
    layer by layer and every image gets nearly the same embedding). The "same network before
    training" baseline; eval mode, on the CPU."""
    import torch

    from compress_edge.data.transforms import eval_transform
    from compress_edge.models.resolve import rebuild, recalibrate_batchnorm

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = rebuild(spec.arch, spec.arch_kwargs, normalize=spec.normalize)
    tf = eval_transform(spec.image_size, spec.mean, spec.std)
    n = min(len(dataset), int(images))
    order = np.random.default_rng(seed).permutation(len(dataset))[:n]
    batches = (torch.stack([tf(dataset.get_image(int(i))) for i in order[s : s + 256]]) for s in range(0, n, 256))
    return recalibrate_batchnorm(model, batches)


# --------------------------------------------------------------------------------------------------
# the comparison a run ends with
# --------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """kNN (1-NN and weighted 20-NN, %) and spread of a model and its baselines on held-out queries."""

    rows: dict[str, dict[str, Any]]
    gallery: int
    queries: int
    warnings: list[str] = field(default_factory=list)
    #: per row, whether each query's weighted 20-NN vote was right (for paired margins; not written out)
    hits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"rows": self.rows, "gallery": self.gallery, "queries": self.queries, "warnings": self.warnings}
        margins = {f"{who} - {baseline}": m for who in self.rows for baseline in BASELINES
                   if who not in BASELINES and (m := self.margin(who, baseline)) is not None}
        return {**out, "margins": margins} if margins else out

    def beats(self, who: str, baseline: str, metric: str = "knn20") -> bool:
        return self.rows[who][metric] > self.rows[baseline][metric]

    def margin(self, who: str, baseline: str) -> dict[str, float] | None:
        """``who``'s lead over ``baseline`` in weighted 20-NN points on the same queries, and its standard
        error from the per-query differences (a paired estimate: both score the same images); None
        without per-query results."""
        a, b = self.hits.get(who), self.hits.get(baseline)
        if a is None or b is None or len(a) != len(b) or len(a) < 2:
            return None
        d = a.astype(np.float64) - b.astype(np.float64)
        return {"points": round(100 * float(d.mean()), 2),
                "standard_error": round(100 * float(d.std(ddof=1)) / math.sqrt(len(d)), 2)}

    def small_lead(self, who: str, baseline: str) -> str | None:
        """When ``who``'s lead over ``baseline`` is under NOISE_STANDARD_ERRORS paired standard errors, the
        sentence that says so (the caller adds what to do); else None."""
        m = self.margin(who, baseline)
        if m is None or m["points"] >= NOISE_STANDARD_ERRORS * m["standard_error"]:
            return None
        return (f"{who} leads {baseline} by only {m['points']:.1f} points of weighted 20-NN on {self.queries} held-out "
                f"images, less than {NOISE_STANDARD_ERRORS:g} standard errors ({m['standard_error']:.1f} each)")

    def small_deficit(self, who: str, baseline: str) -> str | None:
        """When ``who`` trails ``baseline`` by less than NOISE_STANDARD_ERRORS paired standard errors, the
        words that say the held-out images cannot tell (a small hold-out, 50 images, gives a teacher 4
        points behind raw pixels that was 5 ahead on 720 test images); else None."""
        m = self.margin(who, baseline)
        if m is None or m["points"] > 0 or -m["points"] >= NOISE_STANDARD_ERRORS * m["standard_error"]:
            return None
        return (f"by {-m['points']:.1f} points, less than {NOISE_STANDARD_ERRORS:g} standard errors "
                f"({m['standard_error']:.1f} each): too few images to be sure")


def knn_row(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
            *, spread_of: np.ndarray | None = None, device: str = "cpu") -> tuple[dict[str, Any], np.ndarray]:
    """1-NN and weighted 20-NN accuracy (%) of ``queries`` against ``gallery``, and their spread; with
    whether each query's weighted 20-NN vote was right (bool (Q,))."""
    from compress_edge.devices import resolve_device
    from compress_edge.eval.inputs import count_classes
    from compress_edge.eval.neighbors import exact_topk, knn_predict

    yg, yq = np.asarray(gallery_labels, dtype=np.int64), np.asarray(query_labels, dtype=np.int64)
    k = max(1, min(20, len(gallery)))
    sims, idx = exact_topk(l2_normalize(queries), l2_normalize(gallery), k, device=resolve_device(str(device)))
    votes, classes = yg[idx], count_classes(yg, yq)
    nearest = knn_predict(sims, votes, classes, k=1).reshape(-1) == yq
    hits = knn_predict(sims, votes, classes, k=k).reshape(-1) == yq
    spread = embedding_spread(queries if spread_of is None else spread_of)
    return {"nn": round(100 * float(nearest.mean()), 2), "knn20": round(100 * float(hits.mean()), 2),
            "spread": spread.to_dict()}, hits


def score_rows(pairs: dict[str, tuple[np.ndarray, np.ndarray]], gallery_labels, query_labels, *,
               device: str = "cpu") -> Comparison:
    """The kNN row (and per-query hits) of each named (gallery, queries) embedding pair, on the same
    labelled gallery and queries."""
    yg, yq = np.asarray(gallery_labels), np.asarray(query_labels)
    scored = {who: knn_row(g, yg, q, yq, device=device) for who, (g, q) in pairs.items()}
    return Comparison(rows={who: row for who, (row, _) in scored.items()}, gallery=len(yg), queries=len(yq),
                      hits={who: hits for who, (_, hits) in scored.items()})


def compare_with_baselines(
    name: str,
    features: tuple[np.ndarray, np.ndarray],
    gallery,
    queries,
    spec,
    *,
    random_features: tuple[np.ndarray, np.ndarray] | None = None,
    teacher_features: tuple[np.ndarray, np.ndarray] | None = None,
    device: str = "cpu",
    workers: int = 0,
    progress: bool = False,
    use_cache: bool = False,
    advice: str = STUDENT_ADVICE,
) -> Comparison:
    """Compare a model with raw pixels and its random-weights twin (and its teacher) by kNN.

    features: the model's (gallery (N, D), queries (Q, D)) embeddings of the ``gallery`` and
    ``queries`` datasets (labelled). random_features / teacher_features: the same pairs for the
    random-weights twin (computed here from ``spec`` when None) and the teacher (optional). ``advice``:
    what the warning says to do when the model does not beat raw pixels.
    """
    from compress_edge.eval.features import extract_features

    if random_features is None:
        twin = random_weights_model(spec, gallery)
        kw = dict(spec=spec, device=device, workers=workers, use_cache=use_cache, progress=progress)
        random_features = (extract_features(twin, gallery, **kw)[0], extract_features(twin, queries, **kw)[0])
    pairs = {name: features}
    if teacher_features is not None:
        pairs["teacher"] = teacher_features
    pairs["same network, random weights"] = random_features
    pairs["raw pixels"] = (model_pixels(gallery, spec), model_pixels(queries, spec))
    result = score_rows(pairs, gallery.labels, queries.labels, device=device)
    result.warnings = comparison_warnings(result, name, advice)
    return result


def baseline_warning(result: Comparison, who: str, baseline: str, *, todo: str, close_lead: str) -> str | None:
    """The warning when ``who`` does not beat ``baseline`` (then ``todo``, after a test set when the
    held-out images cannot tell: :meth:`Comparison.small_deficit`), or leads it by less than the noise
    (:meth:`Comparison.small_lead`, ended by ``close_lead``); None for a clear lead."""
    if result.beats(who, baseline):
        small = result.small_lead(who, baseline)
        return None if small is None else small + close_lead
    said = (f"{who} does not beat {baseline} on {result.queries} held-out images (weighted 20-NN "
            f"{result.rows[who]['knn20']:.1f} % vs {result.rows[baseline]['knn20']:.1f} %)")
    if (deficit := result.small_deficit(who, baseline)) is None:
        return f"{said}: {todo}"
    return f"{said}, {deficit}; {SCORE_ON_A_TEST_SET}, and if it is no better there: {todo}"


def comparison_warnings(result: Comparison, name: str, advice: str = STUDENT_ADVICE) -> list[str]:
    """Plain warnings when ``name`` does not beat a baseline (``advice``: what to do when that baseline
    is raw pixels), or, for a student, trails its teacher."""
    out = []
    for baseline in BASELINES:
        todo = advice if baseline == "raw pixels" else "this model has learned little; train longer or on more images"
        if said := baseline_warning(result, name, baseline, todo=todo, close_lead=(
                f": too few images to tell the two apart; {SCORE_ON_A_TEST_SET} before relying on it")):
            out.append(said)
    teacher_spread = None
    if "teacher" in result.rows:
        teacher_spread = Spread.from_dict(result.rows["teacher"]["spread"])
        gap = result.rows["teacher"]["knn20"] - result.rows[name]["knn20"]
        if gap > 5.0:
            out.append(f"{name} trails its teacher by {gap:.1f} points of weighted 20-NN on the held-out images; "
                       "more images, more steps (more --epochs, or a smaller --batch-size) or a wider student narrow "
                       "it (a teacher that trained on these images scores optimistically here)")
    spread = Spread.from_dict(result.rows[name]["spread"])
    if out or not spread.narrow_cone:  # a narrow cone is a prompt for the kNN check that has just passed
        out += spread_warnings(spread, name, reference=teacher_spread)
    return out


#: Labelled data sets smaller than this keep no held-out images (too few to spare and to score).
HOLDOUT_MINIMUM = 100


def holdout_split(labels: np.ndarray, fraction: float, *, cap: int = 1000, minimum: int = HOLDOUT_MINIMUM,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) for a labelled dataset: ``fraction`` of the images (at most
    ``cap``), drawn with a fixed seed and stratified by class; nothing is held out for fewer than
    ``minimum`` labelled images or a fraction of 0."""
    labels = np.asarray(labels)
    n = len(labels)
    everything = np.arange(n)
    if fraction <= 0 or n < minimum or (labels < 0).any():
        return everything, everything[:0]
    want = min(int(cap), max(1, int(math.floor(n * float(fraction)))))
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = everything[labels == c]
        take = int(round(want * len(members) / n))
        held.append(rng.choice(members, size=min(take, len(members) - 1), replace=False) if take else members[:0])
    out = np.sort(np.concatenate(held))
    mask = np.ones(n, dtype=bool)
    mask[out] = False
    return everything[mask], out


# --------------------------------------------------------------------------------------------------
# what a training run records at its start and end (quality.json in the run folder)
# --------------------------------------------------------------------------------------------------
QUALITY_FILE = "quality.json"
#: The gallery of the end-of-run kNN check is at most this many training images.
CHECK_GALLERY = 10_000


def record_quality(run_dir, key: str, record: dict[str, Any]) -> None:
    """Merge ``{key: record}`` into ``RUN_DIR/quality.json`` (written atomically)."""
    import json
    from pathlib import Path

    from compress_edge.storage import atomic_write_json

    path = Path(run_dir) / QUALITY_FILE
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s was damaged; writing it anew", path)
    current[key] = record
    atomic_write_json(path, current)


def _warn_all(warnings: list[str]) -> None:
    for w in warnings:
        log.warning("%s", w)


def teacher_check(embeddings: np.ndarray, temperature: float, *, queries: int = 512) -> dict[str, Any]:
    """Spread of a teacher's embeddings of some training images, and how many of them its softmax at
    ``temperature`` covers (the first ``queries`` rows against all of them); warns when the
    distribution is near uniform or one-hot, or the embeddings have collapsed."""
    spread = embedding_spread(embeddings)
    entropy = anchor_entropy(embeddings[:queries], embeddings, temperature)
    warnings = temperature_warnings(entropy, temperature) + spread_warnings(spread, "the teacher")
    _warn_all(warnings)
    log.info("teacher: %s; at T = %g its softmax covers %.0f of %d anchors", spread.describe(), temperature,
             entropy["effective"], entropy["anchors"])
    return {"spread": spread.to_dict(), "softmax": entropy, "temperature": temperature, "warnings": warnings}


def teacher_against_pixels(features: tuple[np.ndarray, np.ndarray], gallery, queries, image_size: int, *,
                           grey: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Before a distillation: the teacher's kNN against raw pixels', its ``features`` of the labelled
    ``gallery`` and held-out ``queries`` (weighted 20-NN, raw pixels at ``image_size`` as in the
    end-of-run check). The student learns its teacher's neighbourhoods, so a teacher that does not
    beat raw pixels gives a student that does not either, whatever the run: said before the run, not
    after it. ``grey``: the teacher sees grey images (``grey_input``), and so do its raw pixels. Logs a
    summary and plain warnings; returns the record for quality.json."""
    raw = (raw_pixel_features(gallery, image_size, grey=grey), raw_pixel_features(queries, image_size, grey=grey))
    result = score_rows({"the teacher": features, "raw pixels": raw}, gallery.labels, queries.labels, device=device)
    teacher, pixels = result.rows["the teacher"]["knn20"], result.rows["raw pixels"]["knn20"]
    stronger = ("a student copies its teacher's neighbourhoods, so more distillation will not fix this: bring a "
                "stronger teacher (--teacher MODEL_DIR, or --teacher ARCH --teacher-weights FILE: a supervised or "
                "self-supervised checkpoint trained on many images)")
    if said := baseline_warning(result, "the teacher", "raw pixels", todo=stronger,
                                close_lead=f"; if it is no better on your test set, {stronger}"):
        result.warnings.append(said)
    log.info("teacher against raw pixels, %d held-out images searched among %d: weighted 20-NN %.1f %% vs %.1f %% "
             "(1-NN %.1f %% vs %.1f %%)", result.queries, result.gallery, teacher, pixels,
             result.rows["the teacher"]["nn"], result.rows["raw pixels"]["nn"])
    _warn_all(result.warnings)
    return result.to_dict()


def _no_heldout_reason(dataset) -> str:
    """Why a run kept no held-out images, in the words of its log line."""
    if not dataset.has_labels:
        return "no labels"
    if len(dataset) < HOLDOUT_MINIMUM:
        return f"{len(dataset)} labelled images, fewer than {HOLDOUT_MINIMUM}"
    return "nothing held out (holdout 0)"


def report_colour_check(found: dict[str, Any] | None) -> None:
    """Log what :func:`colour_check` found, and what the run does about it."""
    if found is None:
        return
    c, p = found["chroma"], found["pixels"]
    if found["grey"]:
        why = ("the colours say nothing of the class" if c["says_nothing"] else "the colours mislead")
        then = f"{why}, so the model sees grey images (--colour keeps the colours)"
    else:
        then = "the model sees colour (--grey makes it see grey images)"
    log.info("colour check, %d labelled images each searched among the others (weighted 20-NN): colours alone "
             "%.1f %% (chance %.1f %%), raw pixels %.1f %% in grey and %.1f %% in colour: %s", found["images"],
             c["knn20"], c["chance"], p["grey_knn20"], p["colour_knn20"], then)


def heldout_check(name: str, model, spec, dataset, heldout: np.ndarray, *, teacher=None, teacher_spec=None,
                  device="cpu", workers: int = 0, seed: int = 0, advice: str = STUDENT_ADVICE) -> dict[str, Any]:
    """The end-of-run check: ``model`` against raw pixels and its random-weights twin (and its
    teacher) by kNN, the held-out images of ``dataset`` searched among (at most CHECK_GALLERY of) its
    other images. Without held-out images (unlabelled data), only the spread. Logs a summary and
    plain warnings; returns the record for quality.json."""
    from compress_edge.data.datasets import SubsetDataset
    from compress_edge.eval.features import extract_features
    from compress_edge.models.spec import is_grey_input

    kw = dict(device=str(device), workers=workers, use_cache=False, progress=False)
    rng = np.random.default_rng(seed)
    rest = np.setdiff1d(np.arange(len(dataset)), heldout)
    gallery_idx = np.sort(rng.choice(rest, size=min(len(rest), CHECK_GALLERY), replace=False))
    gallery = SubsetDataset(f"{dataset.name} (training images)", dataset, indices=gallery_idx)
    if len(heldout) == 0:
        feats = extract_features(model, gallery, spec=spec, **kw)[0]
        spread = embedding_spread(feats)
        warnings = spread_warnings(spread, name)
        _warn_all(warnings)
        reason = _no_heldout_reason(dataset)
        log.info("%s: %s (%s: no held-out kNN check)", name, spread.describe(), reason)
        return {"spread": spread.to_dict(), "warnings": warnings, "no_heldout_check": reason}
    queries = SubsetDataset(f"{dataset.name} (held out)", dataset, indices=heldout)
    feats = (extract_features(model, gallery, spec=spec, **kw)[0], extract_features(model, queries, spec=spec, **kw)[0])
    teacher_feats = None
    if teacher is not None:
        tkw = dict(kw, spec=teacher_spec)
        teacher_feats = (extract_features(teacher, gallery, **tkw)[0], extract_features(teacher, queries, **tkw)[0])
    result = compare_with_baselines(name, feats, gallery, queries, spec, teacher_features=teacher_feats,
                                    advice=advice, **kw)
    summary = ", ".join(f"{who} {row['knn20']:.1f} % ({row['nn']:.1f} %)" for who, row in result.rows.items())
    grey = is_grey_input(spec)
    log.info("held-out check, %d images searched among %d: weighted 20-NN (1-NN): %s%s", result.queries,
             result.gallery, summary, " (raw pixels in grey, as the model sees them)" if grey else "")
    _warn_all(result.warnings)
    return {**result.to_dict(), "raw_pixels": "grey" if grey else "as given"}
