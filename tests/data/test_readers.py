import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from looplm_mega.data.readers import DocumentReader, InvalidInputError, detect_format, expand_inputs

GOOD = [{"text": "first document"}, {"text": "second\nwith two lines"}, {"text": "third é ü 字"}]


def _write_lines(path, lines):
    """Raw lines (str or bytes), each followed by a newline."""
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def _jsonl(path, records):
    return _write_lines(path, [json.dumps(r) for r in records])


def _read(inputs, **kwargs):
    reader = DocumentReader(inputs, **kwargs)
    return reader, list(reader)


def test_jsonl_documents_carry_text_source_and_line(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", GOOD)
    reader, documents = _read(path)
    assert [d.text for d in documents] == [r["text"] for r in GOOD]
    assert [d.line for d in documents] == [1, 2, 3]
    assert {d.source for d in documents} == {str(path)}
    assert reader.bytes_read == reader.total_bytes == path.stat().st_size
    assert not reader.skipped


BAD_LINES = [
    ('{"text": "unterminated', "malformed_json", "malformed JSON"),
    ('{"body": "no text key"}', "missing_key", "no key 'text'"),
    ('{"text": 5}', "not_a_string", "'text' is int 5, not a string"),
    ('{"text": null}', "not_a_string", "'text' is NoneType None"),
    ('["a", "list"]', "not_an_object", "expected a JSON object, got list"),
    (b'{"text": "bad \xff byte"}', "invalid_utf8", "invalid UTF-8"),
    ('{"text": "lone \\ud800 surrogate"}', "invalid_utf8", "lone surrogate"),
]


@pytest.mark.parametrize("line, reason, message", BAD_LINES)
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, line, reason, message):
    path = _write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD[0]), line, json.dumps(GOOD[1])])
    with pytest.raises(InvalidInputError, match=message) as error:
        _read(path)
    assert f"{path}:2: " in str(error.value) and "--skip-invalid" in str(error.value)


@pytest.mark.parametrize("line, reason, message", BAD_LINES)
def test_bad_line_is_skipped_and_counted_with_skip_invalid(tmp_path, line, reason, message):
    path = _write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD[0]), line, json.dumps(GOOD[1]), line])
    reader, documents = _read(path, skip_invalid=True)
    assert [(d.text, d.line) for d in documents] == [(GOOD[0]["text"], 1), (GOOD[1]["text"], 3)]
    assert reader.skipped == {reason: 2}


def test_empty_documents_are_skipped_and_counted_without_skip_invalid(tmp_path):
    path = _write_lines(tmp_path / "a.jsonl", ['{"text": ""}', json.dumps(GOOD[0]), "", '{"text": " \\n\\t"}', "  "])
    reader, documents = _read(path)
    assert [(d.text, d.line) for d in documents] == [(GOOD[0]["text"], 2)]
    assert reader.skipped == {"empty": 4}


def test_byte_order_mark_on_the_first_line_is_accepted(tmp_path):
    path = _write_lines(tmp_path / "a.jsonl", [b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode()])
    assert [d.text for d in _read(path)[1]] == [GOOD[0]["text"]]


def test_several_keys_come_together_and_a_record_missing_one_is_skipped_whole(tmp_path):
    records = [{"text": "body one", "title": "one"}, {"text": "body two"}, {"text": "body three", "title": "three"}]
    path = _jsonl(tmp_path / "a.jsonl", records)
    with pytest.raises(InvalidInputError, match=":2: no key 'title'"):
        _read(path, keys=("text", "title"))
    reader, documents = _read(path, keys=("text", "title"), skip_invalid=True)
    assert [d.texts for d in documents] == [("body one", "one"), ("body three", "three")]
    assert reader.skipped == {"missing_key": 1}


def test_gzip_and_zstd_read_like_plain_jsonl(tmp_path):
    data = b"".join(json.dumps(r).encode() + b"\n" for r in GOOD * 50)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    # Two zstd frames, as pzstd or `cat a.zst b.zst` produce.
    half = len(data) // 2
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.compress(data[:half]) + zstandard.compress(data[half:]))
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        reader, documents = _read(tmp_path / name)
        assert [d.text for d in documents] == [r["text"] for r in GOOD * 50]
        assert documents[-1].line == 150
        assert reader.bytes_read == reader.total_bytes == (tmp_path / name).stat().st_size


def test_bad_line_in_a_compressed_file_names_file_and_line(tmp_path):
    data = f'{json.dumps(GOOD[0])}\n{json.dumps(GOOD[1])}\n{{"text": 1}}\n'.encode()
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(zstandard.compress(data))
    with pytest.raises(InvalidInputError, match=f"{path}:3: 'text' is int"):
        _read(path)


def test_text_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("second file\nline two\n")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "empty.txt").write_text("\n\n")
    reader, documents = _read(tmp_path, input_format="text", text_mode="file")
    assert [(d.text, d.line) for d in documents] == [("first file", 1), ("second file\nline two\n", 1)]
    assert [d.source for d in documents] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert reader.skipped == {"empty": 1}


def test_text_one_document_per_line(tmp_path):
    path = _write_lines(tmp_path / "a.txt", ["alpha", "", "beta\r", "   ", "gamma"])
    reader, documents = _read(path, text_mode="line")
    assert [(d.text, d.line) for d in documents] == [("alpha", 1), ("beta", 3), ("gamma", 5)]
    assert reader.skipped == {"empty": 2}


@pytest.mark.parametrize("text_mode", ["file", "line"])
def test_invalid_utf8_in_text_names_the_line(tmp_path, text_mode):
    path = _write_lines(tmp_path / "a.txt", [b"fine", b"also fine", b"broken \xc3\x28 here", b"after"])
    with pytest.raises(InvalidInputError, match=f"{path}:3: invalid UTF-8"):
        _read(path, text_mode=text_mode)
    reader, documents = _read(path, text_mode=text_mode, skip_invalid=True)
    assert reader.skipped == {"invalid_utf8": 1}
    assert [d.text for d in documents] == ([] if text_mode == "file" else ["fine", "also fine", "after"])


def test_gzipped_text_lines(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"one\ntwo\n"))
    assert [d.text for d in _read(tmp_path / "a.txt.gz", text_mode="line")[1]] == ["one", "two"]


def _parquet(path, columns, row_group_size=2):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_streams_rows_across_row_groups(tmp_path):
    texts = [f"row {i}" for i in range(7)]
    path = _parquet(tmp_path / "a.parquet", {"text": texts, "id": list(range(7))})
    assert pq.ParquetFile(path).num_row_groups == 4
    reader, documents = _read(path)
    assert [(d.text, d.line) for d in documents] == [(t, i + 1) for i, t in enumerate(texts)]
    assert reader.bytes_read == reader.total_bytes


def test_parquet_null_and_empty_values(tmp_path):
    path = _parquet(tmp_path / "a.parquet", {"text": ["a", None, "", "b"]})
    with pytest.raises(InvalidInputError, match=f"{path}, row 2: 'text' is null"):
        _read(path)
    reader, documents = _read(path, skip_invalid=True)
    assert [d.text for d in documents] == ["a", "b"]
    assert reader.skipped == {"not_a_string": 1, "empty": 1}


@pytest.mark.parametrize("columns, reason, message", [
    ({"body": ["a", "b", "c"]}, "missing_key", "no column 'text' \\(columns: body\\)"),
    ({"text": [1, 2, 3]}, "not_a_string", "column 'text' holds int64, not strings"),
])
def test_parquet_bad_column_names_the_file(tmp_path, columns, reason, message):
    path = _parquet(tmp_path / "a.parquet", columns)
    with pytest.raises(InvalidInputError, match=f"{path}: {message}"):
        _read(path)
    reader, documents = _read(path, skip_invalid=True)
    assert documents == [] and reader.skipped == {reason: 3}


def test_huggingface_datasets_reads_local_files(tmp_path):
    _jsonl(tmp_path / "a.jsonl", GOOD)
    reader, documents = _read(tmp_path / "a.jsonl", input_format="hf")
    assert [(d.text, d.line) for d in documents] == [(r["text"], i + 1) for i, r in enumerate(GOOD)]


def test_huggingface_datasets_reads_a_folder_of_a_dataset_directory(tmp_path):
    """--hf-data-dir: a folder within the dataset (as MegaMath's subsets are), as load_dataset's data_dir."""
    for folder in ("web", "pro"):
        (tmp_path / folder).mkdir()
    _jsonl(tmp_path / "web/a.jsonl", GOOD[:1])
    _jsonl(tmp_path / "pro/b.jsonl", GOOD[1:])
    _, documents = _read(tmp_path, input_format="hf", hf_data_dir="pro")
    assert [d.text for d in documents] == [r["text"] for r in GOOD[1:]]
    _, documents = _read(tmp_path, input_format="hf", hf_data_dir="web")
    assert [d.text for d in documents] == [GOOD[0]["text"]]


def test_expand_inputs_files_directories_and_globs(tmp_path):
    for name in ("b.jsonl", "a.jsonl.gz", "sub/c.parquet", "notes.md", ".hidden/d.jsonl", "sub/.e.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert expand_inputs(tmp_path) == [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl", tmp_path / "sub/c.parquet"]
    # With an explicit format a directory gives every (non-hidden) file.
    assert tmp_path / "notes.md" in expand_inputs(tmp_path, "text")
    assert expand_inputs(str(tmp_path / "*.jsonl*")) == [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl"]
    assert expand_inputs([tmp_path / "b.jsonl", str(tmp_path / "*.jsonl")]) == [tmp_path / "b.jsonl"]
    with pytest.raises(FileNotFoundError, match="nothing.jsonl: no such file"):
        expand_inputs(tmp_path / "nothing.jsonl")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/readme.md").write_text("")
    with pytest.raises(FileNotFoundError, match="docs: the directory holds no input files with a known suffix"):
        expand_inputs(tmp_path / "docs")
    with pytest.raises(InvalidInputError, match="readme.md: cannot tell the format"):
        DocumentReader(tmp_path / "docs/readme.md")


def test_detect_format():
    assert detect_format("x/a.jsonl.zst") == "jsonl" and detect_format("a.JSON.gz") == "jsonl"
    assert detect_format("a.txt") == "text" and detect_format("a.parquet") == "parquet"
    with pytest.raises(InvalidInputError, match="a.csv: cannot tell the format"):
        detect_format("a.csv")
