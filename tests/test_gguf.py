"""checkpoints.py's GGUF reader against llama.cpp's own Python package (gguf, test-only) and transformers: the
dequantisers bit for bit, files written by gguf.GGUFWriter (every metadata value type, versions 2 and 3, every
supported tensor type, tied and untied), a real Q4_1 SmolLM2 checkpoint's logits and greedy tokens, and bad files."""
import numpy as np
import pytest
import torch

import checkpoints
from conftest import shared_path
from checkpoints import from_pretrained
from model import ModelArgs

gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's reader) is a test-only dependency (requirements-dev.txt)")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

SUPPORTED = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]  # the package has no quantiser for the K-quants
# where each type keeps its float16 scales (d, and dmin / m): random bytes there could be NaN or huge
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
REAL = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def random_blocks(qtype, rows, row_values, rng):
    """Random bytes for `rows` rows of `row_values` values of qtype, with small finite float16 scales: [rows, bytes]."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, row_values // block_values, block_bytes), dtype=np.uint8)
    for start in F16_FIELDS.get(qtype, []):
        scales = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
        raw[:, :, start:start + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def encode(w: np.ndarray, qtype, rng):
    """A float32 matrix [out, in] as qtype's bytes [out, bytes per row]: quantised by the package where it can,
    random blocks otherwise (the K-quants)."""
    if qtype in QUANTIZABLE:
        return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(w.shape[0], -1)
    return random_blocks(qtype, *w.shape, rng)


# ---------------------------------------------------------------------------------------------------------------
# 1. dequantisation, every supported type, against gguf.quants.dequantize

@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_equals_gguf_package_bit_for_bit(qtype):
    # random bytes reach every bit pattern of the packed values and scales; quantised random weights are what a
    # real file holds. Equal to the bit: the same float32 operations in the same order as ggml (NaN in F32/F16/BF16
    # random bytes included, in the same places)
    rng = np.random.default_rng(int(qtype))
    inputs = [random_blocks(qtype, 8, 1024, rng)]
    if qtype in QUANTIZABLE:
        inputs.append(encode(rng.standard_normal((8, 1024)).astype(np.float32), qtype, rng))
    for raw in inputs:
        reference = gguf.quants.dequantize(raw, qtype).reshape(-1)
        ours = checkpoints.dequantize_gguf(raw.reshape(-1), int(qtype))
        assert ours.dtype == np.float32 and ours.shape == reference.shape == (8 * 1024,)
        np.testing.assert_array_equal(ours, reference.astype(np.float32))


def test_dequantize_works_in_chunks():
    # more than one chunk of about 1M values: the chunks must land in their place
    rng = np.random.default_rng(0)
    raw = random_blocks(T.Q4_K, 5, 256 * 1024, rng)
    np.testing.assert_array_equal(checkpoints.dequantize_gguf(raw.reshape(-1), int(T.Q4_K)),
                                  gguf.quants.dequantize(raw, T.Q4_K).reshape(-1))


# ---------------------------------------------------------------------------------------------------------------
# 2. files written by gguf.GGUFWriter

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN, VOCAB, CONTEXT = 256, 2, 4, 2, 512, 300, 64  # K-quant rows: 256 values
LAYER_MATRICES = {"attn_q": (DIM, DIM), "attn_k": (N_KV_HEADS * DIM // N_HEADS, DIM),
                  "attn_v": (N_KV_HEADS * DIM // N_HEADS, DIM), "attn_output": (DIM, DIM), "ffn_gate": (HIDDEN, DIM),
                  "ffn_up": (HIDDEN, DIM), "ffn_down": (DIM, HIDDEN)}  # [out, in]
# GGUF name -> Meta name, written out here rather than taken from checkpoints.py
META = {"token_embd.weight": "tok_embeddings.weight", "output.weight": "output.weight",
        "output_norm.weight": "norm.weight"}
META.update({f"blk.{i}.{g}.weight": f"layers.{i}.{m}.weight" for i in range(N_LAYERS) for g, m in [
    ("attn_q", "attention.wq"), ("attn_k", "attention.wk"), ("attn_v", "attention.wv"), ("attn_output", "attention.wo"),
    ("ffn_gate", "feed_forward.w1"), ("ffn_up", "feed_forward.w3"), ("ffn_down", "feed_forward.w2"),
    ("attn_norm", "attention_norm"), ("ffn_norm", "ffn_norm")]})


def write_gguf(path, arch="llama", kv=(), tensors=(), alignment=None, **writer_kw):
    """kv: (GGUFWriter method, its arguments...), e.g. ("add_uint32", "llama.block_count", 2); tensors: (name, bytes
    [rows, bytes per row] or flat, ggml type)."""
    w = gguf.GGUFWriter(path, arch, **writer_kw)
    if alignment:
        w.add_custom_alignment(alignment)
    for adder, *a in kv:
        getattr(w, adder)(*a)
    for name, raw, qtype in tensors:
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def set_version(path, version: int):
    with open(path, "r+b") as f:
        f.seek(4)  # after the magic
        f.write(version.to_bytes(4, "little"))


def llama_kv(arch="llama"):
    return [("add_uint32", f"{arch}.context_length", CONTEXT), ("add_uint32", f"{arch}.embedding_length", DIM),
            ("add_uint32", f"{arch}.block_count", N_LAYERS), ("add_uint32", f"{arch}.feed_forward_length", HIDDEN),
            ("add_uint32", f"{arch}.attention.head_count", N_HEADS),
            ("add_uint32", f"{arch}.attention.head_count_kv", N_KV_HEADS),
            ("add_float32", f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            ("add_float32", f"{arch}.rope.freq_base", 500000.0), ("add_uint32", f"{arch}.vocab_size", VOCAB),
            ("add_token_list", [f"tok{i}" for i in range(VOCAB)])]


def tiny_llama_tensors(tied: bool, seed=0):
    """[(GGUF name, bytes, type)] of a random tiny LLaMA: the matrices cycle through every supported type (the K-quants
    as random blocks), the norms are F32."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (VOCAB, DIM)}
    for i in range(N_LAYERS):
        shapes.update({f"blk.{i}.{g}.weight": shape for g, shape in LAYER_MATRICES.items()})
        shapes.update({f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,)})
    shapes["output_norm.weight"] = (DIM,)
    if not tied:
        shapes["output.weight"] = (VOCAB, DIM)
    tensors, matrix = [], 0
    for name, shape in shapes.items():
        if len(shape) == 1:  # a norm: F32 around 1
            w = rng.uniform(0.5, 1.5, (1, shape[0])).astype(np.float32)
            tensors.append((name, encode(w, T.F32, rng).reshape(-1), T.F32))
            continue
        qtype = [T.Q4_K, T.Q8_0, T.Q5_K, T.Q4_0, T.Q6_K, T.Q4_1, T.BF16, T.F16, T.F32][matrix % 9]
        matrix += 1
        tensors.append((name, encode((rng.standard_normal(shape) * 0.05).astype(np.float32), qtype, rng), qtype))
    return tensors


def expected_args(tied: bool) -> ModelArgs:
    return ModelArgs(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, vocab_size=VOCAB,
                     hidden_dim=HIDDEN, norm_eps=float(np.float32(1e-5)), rope_theta=500000.0, max_seq_len=CONTEXT,
                     tie_word_embeddings=tied)


@pytest.mark.parametrize("tied, alignment", [(True, None), (False, 64)], ids=["tied", "untied_align64"])
def test_written_tiny_llama_loads_with_the_right_args_and_weights(tmp_path, tied, alignment):
    tensors = tiny_llama_tensors(tied)
    path = write_gguf(tmp_path / "tiny.gguf", kv=llama_kv(), tensors=tensors, alignment=alignment)
    assert checkpoints.read_model_args(path) == expected_args(tied)
    model = from_pretrained(path)
    assert model.args == expected_args(tied)
    assert model.tok_embeddings.weight.dtype == torch.float32  # the first tensor is quantised: float32
    state = model.state_dict()
    assert {META[name] for name, _, _ in tensors} | {"output.weight"} == set(state)
    for name, raw, qtype in tensors:
        # the package's dequantisation of the same bytes; GGUF [in, out] is torch [out, in]; q/k rows as stored
        reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
        assert torch.equal(state[META[name]], reference.reshape(state[META[name]].shape)), name
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    logits, _ = model(torch.randint(0, VOCAB, (2, 8)))
    assert logits.shape == (2, 8, VOCAB) and torch.isfinite(logits).all()
    # a folder holding one .gguf file is that file; dtype as asked
    model16 = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model16.norm.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model16.norm.weight.float(), model.norm.weight, rtol=1e-2, atol=0)


def test_float_tensors_keep_their_dtype(tmp_path):
    # an F16 (or BF16) file is mapped as stored: the model takes the checkpoint's own dtype, as for safetensors
    tensors = [(n, np.ascontiguousarray(gguf.quants.dequantize(raw, q).astype(np.float16)).view(np.uint8), T.F16)
               for n, raw, q in tiny_llama_tensors(tied=True)]
    model = from_pretrained(write_gguf(tmp_path / "f16.gguf", kv=llama_kv(), tensors=tensors))
    assert model.tok_embeddings.weight.dtype == torch.float16
    reference = gguf.quants.dequantize(tensors[1][1], T.F16)  # blk.0.attn_q, [out, in]
    assert torch.equal(model.layers[0].attention.wq.weight.float(), torch.from_numpy(reference))


# every value type GGUF has, as (writer adder, key, value written, value read back)
METADATA = [
    ("add_uint8", "t.u8", 255, 255), ("add_int8", "t.i8", -128, -128), ("add_uint16", "t.u16", 65535, 65535),
    ("add_int16", "t.i16", -32768, -32768), ("add_uint32", "t.u32", 2**32 - 1, 2**32 - 1),
    ("add_int32", "t.i32", -2**31, -2**31), ("add_float32", "t.f32", 0.1, float(np.float32(0.1))),
    ("add_uint64", "t.u64", 2**64 - 1, 2**64 - 1), ("add_int64", "t.i64", -2**63, -2**63),
    ("add_float64", "t.f64", 0.1, 0.1), ("add_bool", "t.bool", True, True), ("add_bool", "t.false", False, False),
    ("add_string", "t.str", "héllo ☃ \n", "héllo ☃ \n"),
    ("add_array", "t.strs", ["a", "", "ü", "<0x0A>"], ["a", "", "ü", "<0x0A>"]),
    ("add_array", "t.i32s", [1, -2, 3], [1, -2, 3]), ("add_array", "t.f32s", [0.5, 0.1], [0.5, float(np.float32(0.1))]),
    ("add_array", "t.bools", [True, False, True], [True, False, True]),
    ("add_array", "t.nested", [[1, 2], [3]], [[1, 2], [3]]),
]
TYPED_ARRAYS = [(V.UINT8, [0, 255]), (V.INT8, [-1, 1]), (V.UINT16, [65535]), (V.INT16, [-2]), (V.UINT32, [7]),
                (V.UINT64, [2**64 - 1]), (V.INT64, [-2**63]), (V.FLOAT64, [0.1, -2.5])]


@pytest.mark.parametrize("version", [3, 2])
def test_metadata_of_every_value_type(tmp_path, version):
    kv = [(adder, key, value) for adder, key, value, _ in METADATA]
    kv += [("add_key_value", f"t.array_{vtype.name}", values, V.ARRAY, vtype) for vtype, values in TYPED_ARRAYS]
    path = write_gguf(tmp_path / "meta.gguf", kv=kv,
                      tensors=[("x.weight", np.arange(4, dtype=np.float32).view(np.uint8), T.F32)])
    if version == 2:  # version 2's layout is version 3's (3 only added big-endian files): the writer writes 3
        set_version(path, 2)
    metadata = checkpoints.read_gguf_metadata(path)
    expected = {"general.architecture": "llama", **{key: read for _, key, _, read in METADATA},
                **{f"t.array_{vtype.name}": values for vtype, values in TYPED_ARRAYS}}
    assert metadata == expected
    assert [type(metadata[k]) for k in ("t.u64", "t.bool", "t.f32", "t.str")] == [int, bool, float, str]
    reader = gguf.GGUFReader(path)
    assert reader.fields["GGUF.version"].contents() == version
    assert {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "t.nested"} \
        == {k: v for k, v in metadata.items() if k != "t.nested"}  # the reader cannot read nested arrays


# ---------------------------------------------------------------------------------------------------------------
# 3. a real file: SmolLM2-135M-Instruct, Q4_1 (token embedding Q8_0, norms F32), against transformers

@pytest.fixture(scope="module")
def smollm2():
    """(path, our model, transformers' model), both float32 on the CPU, loaded once for the module."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency")
    path = shared_path(REAL)
    ours = from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    return path, ours, theirs


@pytest.mark.slow
def test_real_file_args_and_metadata(smollm2):
    path, model, theirs = smollm2
    assert model.args == ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                                   norm_eps=float(np.float32(1e-5)), rope_theta=100000.0, max_seq_len=8192,
                                   tie_word_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    # the dequantised Q8_0 embedding is transformers' (the gguf package's dequantisation) to the bit
    assert torch.equal(model.tok_embeddings.weight, theirs.model.embed_tokens.weight)
    metadata = checkpoints.read_gguf_metadata(path)
    reference = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert metadata == reference
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and metadata["tokenizer.ggml.model"] == "gpt2"


@pytest.mark.slow
def test_real_file_logits_and_greedy_tokens_equal_transformers(smollm2):
    _, model, theirs = smollm2
    tokens = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = model(tokens)[0], theirs(tokens).logits
    assert reference.abs().max() > 10  # real logits, not a model of zeros
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)  # measured: 4.4e-5 (float32 summation order)
    generated = model.generate(tokens.tolist(), max_new_tokens=8)
    reference = theirs.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    assert generated == reference[:, 16:].tolist()


# ---------------------------------------------------------------------------------------------------------------
# 4. bad files: one line naming the file

def assert_one_line(info, path, *words):
    """The error pytest.raises caught is one line naming the file and holding every word."""
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError) as info:
        from_pretrained(path)
    assert_one_line(info, path, "not a GGUF file")
    with pytest.raises(ValueError) as info:
        checkpoints.read_gguf_metadata(path)
    assert_one_line(info, path, "not a GGUF file")
    path.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        checkpoints.read_model_args(path)
    assert_one_line(info, path, "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 3 << 24])
def test_unsupported_version(tmp_path, version):
    path = write_gguf(tmp_path / "v.gguf", kv=llama_kv(), tensors=tiny_llama_tensors(tied=True))
    set_version(path, version)
    with pytest.raises(ValueError) as info:
        from_pretrained(path)
    assert_one_line(info, path, "big-endian" if version == 3 << 24 else f"GGUF version {version}")


def test_big_endian_file(tmp_path):
    path = write_gguf(tmp_path / "be.gguf", kv=llama_kv(), tensors=tiny_llama_tensors(tied=True),
                      endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError) as info:
        checkpoints.read_model_args(path)
    assert_one_line(info, path, "big-endian")


def test_truncated_real_file(tmp_path):
    real = shared_path(REAL)
    _, _, data_start = checkpoints.read_gguf_header(real)
    header_only = tmp_path / "header_only.gguf"
    with open(real, "rb") as src, open(header_only, "wb") as dst:
        dst.write(src.read(data_start))
    # the metadata is all there: the tokenizer's reader needs no tensor data
    assert len(checkpoints.read_gguf_metadata(header_only)["tokenizer.ggml.tokens"]) == 49152
    with pytest.raises(ValueError) as info:
        from_pretrained(header_only)
    assert_one_line(info, header_only, "truncated", "token_embd.weight")
    cut_in_metadata = tmp_path / "cut.gguf"
    with open(real, "rb") as src, open(cut_in_metadata, "wb") as dst:
        dst.write(src.read(100_000))  # in the middle of the vocabulary
    for read in (checkpoints.read_gguf_metadata, checkpoints.read_model_args):
        with pytest.raises(ValueError) as info:
            read(cut_in_metadata)
        assert_one_line(info, cut_in_metadata, "truncated")


def test_truncated_in_tensor_data(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", kv=llama_kv(), tensors=tiny_llama_tensors(tied=False))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)  # the last tensor, output.weight (BF16: 153,600 bytes), loses its end
    with pytest.raises(ValueError) as info:
        from_pretrained(path)
    assert_one_line(info, path, "truncated", "output.weight")


def test_not_llama_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2", kv=llama_kv("gpt2"), tensors=tiny_llama_tensors(tied=True))
    with pytest.raises(ValueError) as info:
        from_pretrained(path)
    assert_one_line(info, path, "'gpt2'", "LLaMA")
    assert checkpoints.read_gguf_metadata(path)["general.architecture"] == "gpt2"  # metadata alone reads any file


def test_unsupported_tensor_type(tmp_path):
    tensors = tiny_llama_tensors(tied=True)
    name, raw, qtype = tensors[3]  # blk.0.attn_v.weight
    w = gguf.quants.dequantize(raw, qtype)
    tensors[3] = (name, gguf.quants.quantize(w, T.Q5_0), T.Q5_0)
    path = write_gguf(tmp_path / "q5_0.gguf", kv=llama_kv(), tensors=tensors)
    with pytest.raises(TypeError) as info:
        from_pretrained(path)
    assert_one_line(info, path, "'blk.0.attn_v.weight'", "Q5_0", "Q4_K, Q5_K, Q6_K")


def test_rope_scaling_is_refused(tmp_path):
    kv = llama_kv() + [("add_string", "llama.rope.scaling.type", "linear"),
                       ("add_float32", "llama.rope.scaling.factor", 4.0)]
    path = write_gguf(tmp_path / "rope.gguf", kv=kv, tensors=tiny_llama_tensors(tied=True))
    with pytest.raises(NotImplementedError) as info:
        checkpoints.read_model_args(path)
    assert_one_line(info, path, "linear")
