"""memory: what the process may still allocate, and sizes for messages."""

from genknowsub_fast import memory


def test_available_bytes_is_positive_or_unknown():
    free = memory.available_bytes()
    assert free is None or free > 0


def test_cgroup_limit_lowers_the_answer(monkeypatch, tmp_path):
    """A cgroup limit below the system's free memory is what counts (a container's 6 GB under a big host)."""
    files = {"/sys/fs/cgroup/memory.max": "6000000000\n", "/sys/fs/cgroup/memory.current": "1000000000\n"}
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path in files:
            p = tmp_path / path.replace("/", "_")
            p.write_text(files[path])
            return real_open(p, *args, **kwargs)
        if path == "/proc/meminfo":
            p = tmp_path / "meminfo"
            p.write_text("MemTotal: 100000000 kB\nMemAvailable: 90000000 kB\n")
            return real_open(p, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert memory.available_bytes() == 5_000_000_000
    files["/sys/fs/cgroup/memory.max"] = "max\n"
    assert memory.available_bytes() == 90_000_000 * 1024


def test_human_bytes():
    assert memory.human_bytes(15.28e9) == "15.3 GB"
    assert memory.human_bytes(6.3e6) == "6 MB"
    assert memory.human_bytes(345_000) == "345 KB"
