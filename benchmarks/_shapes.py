"""Model shapes shared by the benchmarks (``transformers.Qwen3Config`` keyword arguments;
no imports, so that a benchmark's parent process stays light)."""

# the forward-pass benchmark's shape: 8 layers, d_model 256, 4 heads x 64 (2 KV heads)
BENCH_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
)
BENCH_BATCH, BENCH_SEQ = 8, 128

# the real Qwen3-0.6B configuration (random weights in every benchmark)
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
