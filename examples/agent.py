"""A minimal AI agent: one chat completion with the official openai SDK.

It knows nothing about the gateway: the environment points it there, as for any agent.
    HTTPS_PROXY=http://agent:<JWT>@127.0.0.1:8080   the gateway, token as proxy password
    SSL_CERT_FILE=.hoop/mitmproxy/mitmproxy-ca-cert.pem   trust the gateway's CA
    OPENAI_BASE_URL=https://localhost:8443/v1        the upstream (default: api.openai.com)
    OPENAI_API_KEY=<JWT or anything>                 the gateway holds the real key
Prints one JSON object: {"content": <the assistant's reply>}.
"""

import argparse
import json

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Hello! My email is jane.doe@example.com and my card is 4242 4242 4242 4242.")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--stream", action="store_true", help="stream the reply (server-sent events)")
    args = parser.parse_args()

    client = OpenAI(max_retries=0)
    messages = [{"role": "user", "content": args.prompt}]
    if args.stream:
        stream = client.chat.completions.create(model=args.model, messages=messages, stream=True)
        content = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    else:
        reply = client.chat.completions.create(model=args.model, messages=messages)
        content = reply.choices[0].message.content
    print(json.dumps({"content": content}))


if __name__ == "__main__":
    main()
