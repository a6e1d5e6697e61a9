"""The toy task's words: shapes, colours and testbed v2's extra question and answer words.

The bottom of the testbed: the toy tokenizer (toy.py), the v1 generator (synth.py) and the v2
generator (events.py) all read these, and this module imports nothing, so none of them has to
import another for its vocabulary."""

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
# the words of v2 questions and answers beyond v1's vocabulary (a v2 tokenizer appends them)
V2_WORDS = ("comes", "after", "how", "many", "frames", "show", "does", "turn", "into") + NUMBERS + ("most", "often")
