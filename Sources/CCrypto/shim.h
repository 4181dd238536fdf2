// OpenSSL's libcrypto (Debian: libssl-dev), for SHA-256 digests and HMAC-SHA256.
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
