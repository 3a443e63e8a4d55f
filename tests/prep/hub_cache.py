"""A Hugging Face `datasets` cache holding one dataset by name, written offline, as `load_dataset` leaves it."""

from __future__ import annotations

from pathlib import Path


def write_cached_dataset(cache: Path, name: str, splits: dict[str, list[str]]) -> list[Path]:
    """Write ``name`` (``org/name``) into the datasets cache folder ``cache``, a ``text`` column per split;
    return the Arrow files, in split order."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    org, short = name.split("/")
    folder = cache / f"{org}___{short}" / "default" / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    files = []
    for split, texts in splits.items():
        path = folder / f"{short}-{split}.arrow"
        writer = ArrowWriter(path=str(path))
        writer.write_table(datasets.Dataset.from_dict({"text": texts}).data.table)
        writer.finalize()
        files.append(path)
    datasets.DatasetInfo(
        features=datasets.Features({"text": datasets.Value("string")}),
        config_name="default",
        dataset_name=short,
        splits=[{"name": s, "num_examples": len(t), "dataset_name": short} for s, t in splits.items()],
    ).write_to_directory(str(folder))
    return files
