"""The project's own fuzz suite (issue 14): bad and edge arguments, one at a time and in
hypothesis-drawn pairs, for the public ops and strategies (cases.py), and damaged files
(test_files.py). Every outcome is classified: it works (NaN in gives NaN out) or it raises a clear
error (TypeError / ValueError / IndexError naming the op, the argument and what was got); anything
else (an AttributeError from deep inside, a broadcast error, a crash) is a failure. The cases run
in a child process, so a crash fails the test with the case that crashed."""
