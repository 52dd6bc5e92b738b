"""``mlx_lm.server``: no single request can take the server down or keep it busy for nobody.

mlx-lm runs every request through one generation thread. An exception that escapes its loop
(seen: ``"prompt": ""`` on ``/v1/completions``) ends that thread, and every later request
gets "generation thread died". Here:

- a text completion needs a non-empty string prompt (HTTP 400 otherwise), and a prompt of
  no tokens is refused before it reaches the batch;
- if the loop still fails, the requests it held get the error and the loop starts again
  (the model and the prompt cache are kept); only a failure before any request was taken
  (loading the model) ends it, as in mlx-lm;
- a non-streaming request whose client has disconnected stops generating (a streaming one
  already stops at its first failed write).
"""

import logging
import select
import socket
import time
import weakref

CLIENT_CHECK_SECONDS = 0.25  # how often a non-streaming request looks at its socket


def client_gone(sock) -> bool:
    """Whether the peer closed ``sock`` (readable with no data). Bytes it sent early
    (a pipelined request) are left unread."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class ClientGone(Exception):
    """Raised into a request's response loop once its client has disconnected."""


def make_response_generator(base):
    """A subclass of mlx-lm's ``ResponseGenerator`` whose generation loop survives a
    request that breaks it."""

    class ResponseGenerator(base):
        def __init__(self, *args, **kwargs):
            # Set before the base class starts the generation thread.
            self._taken = weakref.WeakSet()  # response queues of requests the loop took
            self._took_request = False
            super().__init__(*args, **kwargs)

        def _next_request(self, timeout=None):
            request = super()._next_request(timeout)
            if request is not None:
                self._taken.add(request[0])
                self._took_request = True
            return request

        def _tokenize(self, tokenizer, request, args):
            result = super()._tokenize(tokenizer, request, args)
            if not result[0]:  # nothing to prefill: the batch generator cannot take it
                raise ValueError("the prompt has no tokens")
            return result

        def _run_generate(self):
            while True:
                self._took_request = False
                try:
                    self._generate()
                    return
                except Exception as e:  # noqa: BLE001 - whatever one request did
                    if self._stop or not self._took_request:
                        logging.exception(f"mlx_lm.server generation thread died: {e}")
                        self._generation_failed = True
                        self._fail_taken(e)
                        return
                    logging.exception("mlx-lm-turbo: a request broke the generation loop; "
                                      f"its requests get the error, the loop restarts: {e}")
                    self._fail_taken(e)

        def _fail_taken(self, error: Exception) -> None:
            # Requests that were answered already ignore it (their reader stopped at None).
            for rqueue in list(self._taken):
                rqueue.put(RuntimeError(f"generation failed: {error}"))
            self._taken = weakref.WeakSet()

    return ResponseGenerator


class _WatchedGenerator:
    """The handler's view of the response generator for one non-streaming request: its
    token stream (and prompt progress) stops once the client has disconnected."""

    def __init__(self, generator, sock):
        self._generator, self._sock = generator, sock
        self._next_check = 0.0

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def _check(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CLIENT_CHECK_SECONDS
            if client_gone(self._sock):
                raise ClientGone

    def generate(self, request, args, progress_callback=None):
        def progress(*done):
            self._check()
            if progress_callback is not None:
                progress_callback(*done)

        ctx, responses = self._generator.generate(request, args, progress_callback=progress)

        def watched():
            for n, response in enumerate(responses, 1):
                self._check()
                self.tokens = n
                yield response

        self.tokens = 0
        return ctx, watched()


def patch_handler(handler_class) -> None:
    """Empty text prompts get 400; abandoned non-streaming requests stop generating."""
    text_completions = handler_class.handle_text_completions
    handle_completion = handler_class.handle_completion

    def handle_text_completions(self):
        prompt = self.body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            # do_POST answers 400 with this message
            raise ValueError("prompt must be a non-empty string")
        return text_completions(self)

    def handle_completion_watched(self, request, stop_words):
        if self.stream:  # its writes fail as soon as the client is gone
            return handle_completion(self, request, stop_words)
        real = self.response_generator
        self.response_generator = watched = _WatchedGenerator(real, self.connection)
        try:
            return handle_completion(self, request, stop_words)  # stops the request (ctx.stop)
        except ClientGone:
            logging.info(f"mlx-lm-turbo: client disconnected; stopped its request after "
                         f"{watched.tokens} tokens")
            self.close_connection = True
        finally:
            self.response_generator = real

    handler_class.handle_text_completions = handle_text_completions
    handler_class.handle_completion = handle_completion_watched
