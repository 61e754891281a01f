"""DVC stage `calculations`: Task 1 (convolution arithmetic, parameter tables) from code."""
from pathlib import Path

from cifarcnn.convmath import task1_answers
from cifarcnn.errors import cli, stage_args
from cifarcnn.figures import task1a_convolution
from cifarcnn.fsutil import write_json, write_text
from cifarcnn.report import all_parameter_tables, task1_markdown

REPORTS = Path("reports")
FIGURE = REPORTS / "figures" / "task1a_convolution.png"


@cli
def main() -> None:
    answers = task1_answers()
    tables = all_parameter_tables()
    a = answers["1a"]
    task1a_convolution(a["image"], a["kernel"], a["result"], FIGURE)
    write_json(REPORTS / "task1.json", {"answers": answers, "parameters": tables})
    write_text(REPORTS / "task1.md", task1_markdown(answers, tables, FIGURE.relative_to(REPORTS).as_posix()))
    print(f"wrote {REPORTS / 'task1.md'}, {REPORTS / 'task1.json'}, {FIGURE}; "
          f"task2 has {tables['task2']['total']:,} parameters")


if __name__ == "__main__":
    main(*stage_args("python stages/calculations.py", 0, __doc__))
