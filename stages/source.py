"""DVC stage `source` (always run): data/source.json, the local data source's content key.

`download` depends on it, so editing an image in a local `data.source` folder (or replacing a
local archive) re-runs `download`; for a URL the file names the URL only (`data.md5` pins its
content) and nothing is fetched here. Reads params.yaml's data.source only; stdlib, no torch.
"""
from pathlib import Path

from cifarcnn.errors import UserError, cli, stage_args
from cifarcnn.fsutil import parse_yaml, write_json
from cifarcnn.sourcekey import source_key

OUT = Path("data/source.json")


@cli
def main() -> None:
    source = ((parse_yaml(Path("params.yaml").read_text()) or {}).get("data") or {}).get("source")
    if not isinstance(source, str) or not source:
        raise UserError(f"data.source: expected a URL or a local path, got {source!r}")
    key = source_key(source)
    write_json(OUT, key)
    print(f"data.source: {source} ({key['kind']}" + (f", {key['files']} files, {key['bytes']:,} bytes" if "files" in key else "")
          + ")")


if __name__ == "__main__":
    main(*stage_args("python stages/source.py", 0, __doc__))
