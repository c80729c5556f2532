import sys
from pathlib import Path


def pytest_terminal_summary(terminalreporter: object) -> None:
    """Print the fault matrix's table (tests/integration/test_fault_matrix.py) if it ran."""
    import os

    for name, module in list(sys.modules.items()):
        if name.endswith("test_fault_matrix") and hasattr(module, "fault_table"):
            table = module.fault_table()
            if table:
                terminalreporter.write_sep("=", "fault matrix")  # type: ignore[attr-defined]
                terminalreporter.write_line(table)  # type: ignore[attr-defined]
                out = os.environ.get("VMMIGRATE_FAULT_TABLE")
                if out:
                    module.write_table(Path(out))
