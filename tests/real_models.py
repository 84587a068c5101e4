"""Tiny configs of real third-party models (transformers, timm, torchvision), each returning its loss.

    model, (args, kwargs) = REAL_MODELS["llama"]()
    loss = model(*args, **kwargs)

Every model is built from its library's config class (no download: HF_HUB_OFFLINE=1) with hidden
size 32, 2 layers, sequence length 8 and batch 4-8, dropout off, and wrapped only so that forward
returns the loss, as a user's training script would. ``available()`` tells whether the libraries
are installed (the `zoo` extra).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

Batch = tuple[tuple, dict]
VOCAB, SEQ, BATCH = 64, 8, 6

_TORCHVISION_LIB = None  # keeps the schema definitions below alive


def import_torchvision():
    """Import torchvision on the CPU torch wheel.

    The only torchvision wheel for torch 2.13 is a CUDA build whose C extension does not load on
    the CPU torch; its import then fails registering fake kernels for ``torchvision::nms``/``qnms``
    (ops the failed extension should have defined). Defining their schemas first lets the pure
    Python parts (models, ops.misc, which timm needs) import; the detection C ops stay unusable.
    """
    global _TORCHVISION_LIB
    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        if _TORCHVISION_LIB is None:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_LIB = lib
    import torchvision

    return torchvision


try:  # transformers and timm import torchvision when it is installed
    import_torchvision()
except ImportError:
    pass


def available() -> bool:
    try:
        import timm  # noqa: F401
        import transformers  # noqa: F401

        import_torchvision()
    except Exception:  # noqa: BLE001 - any import failure means: not installed here
        return False
    return True


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(b: int = BATCH, t: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=_gen(seed))


def _lengths_mask(b: int = BATCH, t: int = SEQ) -> torch.Tensor:
    """A right-padded attention mask whose rows differ (lengths t, t-1, ..., at least 3)."""
    lengths = [max(3, t - i) for i in range(b)]
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths])


class LossOf(nn.Module):
    """``forward(**batch)`` -> ``inner(**batch).loss``: the only change a HF training script needs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.inner(*args, **kwargs).loss


class Classify(nn.Module):
    """A classifier (timm/torchvision) with cross-entropy on its logits."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.inner(images), labels)


class LSTMLanguageModel(nn.Module):
    """Embedding, 2-layer nn.LSTM (batch first), tied output projection, next-token loss."""

    def __init__(self, vocab: int = VOCAB, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, num_layers=2, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(tokens))
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


def _images(b: int = BATCH, size: int = 32, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen()
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)


def _lm_batch() -> Batch:
    ids = _tokens()
    return (), {"input_ids": ids, "labels": ids}


def gpt2() -> tuple[nn.Module, Batch]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return LossOf(GPT2LMHeadModel(cfg)), _lm_batch()


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, **kw)


def llama() -> tuple[nn.Module, Batch]:
    """Llama as a script leaves it: use_cache at its default (True)."""
    from transformers import LlamaForCausalLM

    return LossOf(LlamaForCausalLM(_llama_config())), _lm_batch()


def llama_no_cache() -> tuple[nn.Module, Batch]:
    from transformers import LlamaForCausalLM

    return LossOf(LlamaForCausalLM(_llama_config(use_cache=False))), _lm_batch()


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def bert_mlm() -> tuple[nn.Module, Batch]:
    """Masked LM: every third token masked (labels -100 elsewhere), variable-length padding."""
    from transformers import BertForMaskedLM

    ids = _tokens()
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    masked = ids.clone()
    masked[:, ::3] = 1
    return LossOf(BertForMaskedLM(_bert_config())), \
        ((), {"input_ids": masked, "attention_mask": _lengths_mask(), "labels": labels})


def bert_classify() -> tuple[nn.Module, Batch]:
    """Sequence classification with a variable-length attention mask (the rows differ)."""
    from transformers import BertForSequenceClassification

    labels = torch.randint(0, 3, (BATCH,), generator=_gen(1))
    return LossOf(BertForSequenceClassification(_bert_config(num_labels=3))), \
        ((), {"input_ids": _tokens(), "attention_mask": _lengths_mask(), "labels": labels})


def t5() -> tuple[nn.Module, Batch]:
    """Encoder-decoder: T5 with labels (decoder inputs shifted from them inside the model)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return LossOf(T5ForConditionalGeneration(cfg)), \
        ((), {"input_ids": _tokens(), "attention_mask": _lengths_mask(), "labels": _tokens(seed=2)})


def mixtral() -> tuple[nn.Module, Batch]:
    """Mixture of experts: 4 experts, top-2 routing (data-dependent token counts per expert)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                        num_local_experts=4, num_experts_per_tok=2)
    return LossOf(MixtralForCausalLM(cfg)), _lm_batch()


def vit() -> tuple[nn.Module, Batch]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=10)
    images, labels = _images(size=16)
    return LossOf(ViTForImageClassification(cfg)), ((), {"pixel_values": images, "labels": labels})


def convnext() -> tuple[nn.Module, Batch]:
    import_torchvision()
    import timm

    net = timm.create_model("convnext_atto", pretrained=False, num_classes=10, depths=(1, 1, 1, 1),
                            dims=(16, 16, 32, 32))
    return Classify(net), (_images(), {})


def lstm_lm() -> tuple[nn.Module, Batch]:
    seq = _tokens(t=SEQ + 1)
    return LSTMLanguageModel(), ((seq[:, :-1], seq[:, 1:]), {})


def resnet18() -> tuple[nn.Module, Batch]:
    """torchvision ResNet-18 (BatchNorm), at CIFAR-like 32x32."""
    tv = import_torchvision()
    return Classify(tv.models.resnet18(num_classes=10)), (_images(), {})


REAL_MODELS: dict[str, Callable[[], tuple[nn.Module, Batch]]] = {
    "gpt2": gpt2,
    "llama": llama,
    "llama_no_cache": llama_no_cache,
    "bert_mlm": bert_mlm,
    "bert_classify": bert_classify,
    "t5": t5,
    "mixtral": mixtral,
    "vit": vit,
    "convnext": convnext,
    "lstm_lm": lstm_lm,
    "resnet18": resnet18,
}
BATCH_NORM_MODELS = {"resnet18"}
