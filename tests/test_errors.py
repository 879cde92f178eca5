"""
Tests for L{p2pmta.errors}: what a user is told.
"""

import inspect

from twisted.trial.unittest import SynchronousTestCase

from p2pmta import errors


class MessageTests(SynchronousTestCase):
    """An error says its sentence, and then what went wrong in particular."""

    def test_sentenceAlone(self):
        """Without details, the docstring's sentence."""
        self.assertEqual(
            str(errors.WrongPassword()),
            "The password does not match the one given when the entry was stored.",
        )

    def test_sentenceAndDetail(self):
        """With details, they follow the sentence in brackets."""
        self.assertEqual(
            str(errors.BadAddress("bob")),
            "That is not a p2pmta address of the form name@group. (bob)",
        )

    def test_everyErrorHasASentence(self):
        """
        Every exception of the tree is a L{errors.P2PMTAError} with a
        docstring of its own that reads as one sentence.
        """
        found = [
            value
            for value in vars(errors).values()
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == errors.__name__
        ]
        self.assertGreater(len(found), 10)
        for error in found:
            self.assertTrue(issubclass(error, errors.P2PMTAError), error)
            sentence = (error.__dict__.get("__doc__") or "").strip()
            self.assertTrue(sentence[:1].isupper() and sentence.endswith("."), error)
