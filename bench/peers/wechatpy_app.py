"""wechatpy 1.8 as a WSGI app, doing what wxgate does in the load benchmark: verify the
signature(s), decrypt in safe mode, parse, answer a text message with a text reply and a
subscribe with an encrypted text reply. Served by granian (see ../load.sh)."""
from urllib.parse import parse_qs

from wechatpy import parse_message
from wechatpy.crypto import WeChatCrypto
from wechatpy.replies import TextReply
from wechatpy.utils import check_signature
from wechatpy.exceptions import InvalidSignatureException, InvalidAppIdException

TOKEN = "qaHeldoutTok2024"
AES_KEY = "Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ"
APP_ID = "wx7c1f0e2a9b3d4e5f"
crypto = WeChatCrypto(TOKEN, AES_KEY, APP_ID)


def app(environ, start_response):
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    try:
        check_signature(TOKEN, q.get("signature", ""), q.get("timestamp", ""), q.get("nonce", ""))
    except InvalidSignatureException:
        start_response("403 Forbidden", [("Content-Type", "text/plain")])
        return [b"bad signature"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    try:
        if q.get("encrypt_type") == "aes":
            xml = crypto.decrypt_message(body, q["msg_signature"], q["timestamp"], q["nonce"])
            msg = parse_message(xml)
            reply = TextReply(content="Welcome", message=msg).render()
            out = crypto.encrypt_message(reply, q["nonce"], q["timestamp"])
        else:
            msg = parse_message(body)
            out = TextReply(content=getattr(msg, "content", ""), message=msg).render()
    except (InvalidSignatureException, InvalidAppIdException):
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"bad envelope"]
    data = out.encode("utf-8")
    start_response("200 OK", [("Content-Type", "application/xml"), ("Content-Length", str(len(data)))])
    return [data]
