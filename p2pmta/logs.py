# -*- test-case-name: tests.test_mailflow -*-
"""
Logging helpers shared by the pipelines.
"""

from twisted.internet.defer import CancelledError


def logFailure(log, format: str, **kwargs):
    """
    @return: an errback that logs a failure with C{format}, except work
        cancelled because the peer is stopping, which is only noted.
    """

    def errback(failure):
        if failure.check(CancelledError):
            log.info("interrupted by shutdown: " + format, **kwargs)
        else:
            log.failure(format, failure, **kwargs)

    return errback
