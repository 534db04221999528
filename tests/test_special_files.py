"""A FIFO, a device or a socket inside a model folder or a task directory is refused with one sentence
naming it (issue 26, Deliver 3): a digest or a loader that opened it would wait forever, or read
without end."""
import contextlib
import os
import shutil
import signal
import socket

import pytest

import test_inputs

HANG = 60  # seconds: a command that blocks on the FIFO fails the test instead of hanging it


@contextlib.contextmanager
def deadline(seconds: int):
    def hung(*_):
        raise TimeoutError(f"still blocked after {seconds} s (a FIFO was opened)")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_sentence(capsys, argv, *expected) -> str:
    """test_inputs.one_sentence, under a deadline: a read that hangs fails the test instead."""
    with deadline(HANG):
        return test_inputs.one_sentence(capsys, argv, *expected)


@pytest.fixture
def student(mini_family, tmp_path):
    copy = tmp_path / "student"
    shutil.copytree(mini_family / "student", copy)
    return copy


# config.json and a weights file are opened by the loader and the digest (they blocked before); an
# unknown name is refused too: nothing in a model folder is a pipe
@pytest.mark.parametrize("name", ["config.json", "model-extra.safetensors", "notes.txt"])
def test_a_fifo_in_a_model_folder_is_one_sentence_naming_it(name, mini_family, student, tmp_path, capsys, no_work):
    target = student / name
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    one_sentence(capsys, ["extract", "--teacher", str(mini_family / "teacher"), "--student", str(student), "--seeds",
                          str(mini_family / "tasks/gsm/seeds.jsonl"), "--store", str(tmp_path / "store")],
                 f"{target}: is a FIFO (named pipe)", "the model directory", "remove it")


def test_a_socket_in_a_model_folder_is_refused(mini_family, student, tmp_path, capsys, no_work):
    path = student / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        one_sentence(capsys, ["extract", "--teacher", str(mini_family / "teacher"), "--student", str(student),
                              "--seeds", str(mini_family / "tasks/gsm/seeds.jsonl"), "--store",
                              str(tmp_path / "store")], f"{path}: is a socket")


def test_a_fifo_in_a_task_directory_is_one_sentence_naming_it(mini_family, tmp_path, capsys, no_work):
    task = tmp_path / "gsm"
    shutil.copytree(mini_family / "tasks/gsm", task)
    os.mkfifo(task / "extra.jsonl")
    one_sentence(capsys, ["transfer", "--teacher", str(mini_family / "teacher"), "--student",
                          str(mini_family / "student"), "--task-dir", str(task), "--variants", "lora", "--store",
                          str(tmp_path / "store")], f"{task / 'extra.jsonl'}: is a FIFO", "the task directory")
