"""Fixtures the MCP servers of servers.json start from, made in each server's template folder at run
start (the ``setup`` commands of servers.json): a small git repository with history and a branch, a
shop database, a folder of notes, and a knowledge graph. Same content every run.

    python fixtures.py git DIR | sqlite FILE | files DIR | memory FILE
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

FILES = {
    "README.md": "# inventory-service\n\nTracks stock levels for the Lyon and Porto warehouses.\n",
    "src/inventory.py": "LOW_STOCK = 5\n\n\ndef needs_reorder(count: int) -> bool:\n"
    "    return count < LOW_STOCK\n",
    "notes/meeting-2026-11-30.txt": "Agreed: move the Porto warehouse to the new scanner by 15 January.\n"
    "Owner: Ines. Budget: 4,200 EUR.\n",
    "notes/todo.txt": "- renew the TLS certificate (expires 2027-02-01)\n- archive the 2025 invoices\n",
    "reports/q3-sales.csv": "region,units,revenue_eur\nLyon,1240,86800\nPorto,980,64680\nGdansk,410,27060\n",
}


def git(folder: str) -> None:
    repo = Path(folder)
    repo.mkdir(parents=True, exist_ok=True)
    when = "2026-11-02T09:00:00"
    env = {**os.environ, "GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}

    def run(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=Dana Ruiz", "-c", "user.email=dana@example.com", *args],
            cwd=repo,
            env=env,
            check=True,
            capture_output=True,
        )

    run("init", "-q", "-b", "main")
    for path in ("README.md", "src/inventory.py"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(FILES[path])
    run("add", "-A")
    run("commit", "-qm", "Initial import of the inventory service")
    (repo / "src/inventory.py").write_text(FILES["src/inventory.py"].replace("= 5", "= 8"))
    run("commit", "-qam", "Raise the low-stock threshold to 8 units")
    run("branch", "feature/porto-scanner")
    (repo / "CHANGELOG.md").write_text("## 1.1.0\n- low-stock threshold 8\n")
    (repo / "README.md").write_text(FILES["README.md"] + "\nSee CHANGELOG.md.\n")  # an unstaged change
    run("add", "CHANGELOG.md")


def sqlite(path: str) -> None:
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, since TEXT);
        CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, price_eur REAL, stock INTEGER);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, product_id INTEGER,
                             quantity INTEGER, ordered_on TEXT);
        """
    )
    db.executemany(
        "INSERT INTO customers VALUES (?, ?, ?, ?)",
        [
            (1, "Amelie Laurent", "Lyon", "2023-04-11"),
            (2, "Tomasz Nowak", "Gdansk", "2024-01-20"),
            (3, "Ines Carvalho", "Porto", "2022-09-05"),
            (4, "Kofi Mensah", "Accra", "2025-06-30"),
        ],
    )
    db.executemany(
        "INSERT INTO products VALUES (?, ?, ?, ?)",
        [(1, "barcode scanner", 149.0, 12), (2, "label printer", 289.5, 4), (3, "shelf tag", 0.35, 5000)],
    )
    db.executemany(
        "INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
        [
            (1, 1, 1, 2, "2026-10-03"),
            (2, 3, 2, 1, "2026-10-17"),
            (3, 2, 3, 800, "2026-11-02"),
            (4, 3, 1, 3, "2026-11-21"),
            (5, 4, 3, 150, "2026-11-28"),
        ],
    )
    db.commit()
    db.close()


def files(folder: str) -> None:
    for path, text in FILES.items():
        if path.startswith(("notes/", "reports/")):
            target = Path(folder, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


def memory(path: str) -> None:
    graph = [
        {"type": "entity", "name": "Ines Carvalho", "entityType": "person",
         "observations": ["manages the Porto warehouse", "prefers email over phone"]},
        {"type": "entity", "name": "Porto warehouse", "entityType": "site",
         "observations": ["moves to the new scanner by 15 January 2026"]},
        {"type": "relation", "from": "Ines Carvalho", "to": "Porto warehouse", "relationType": "manages"},
    ]  # fmt: skip
    Path(path).write_text("".join(json.dumps(line) + "\n" for line in graph))


if __name__ == "__main__":
    {"git": git, "sqlite": sqlite, "files": files, "memory": memory}[sys.argv[1]](sys.argv[2])
