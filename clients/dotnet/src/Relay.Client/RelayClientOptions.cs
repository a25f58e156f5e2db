using System;
using System.Threading;
using System.Threading.Tasks;

namespace Relay.Client
{
    /// <summary>The wire format: JSON text frames, or MessagePack binary frames.</summary>
    public enum RelayFormat
    {
        Json,
        MessagePack,
    }

    public enum RelayLogLevel
    {
        Debug,
        Info,
        Warning,
        Error,
    }

    /// <summary>Everything a <see cref="RelayClient"/> needs; only Url and ClientId are required.</summary>
    public sealed class RelayClientOptions
    {
        public RelayClientOptions()
        {
            Format = RelayFormat.Json;
            BackoffBase = TimeSpan.FromSeconds(0.5);
            BackoffMax = TimeSpan.FromSeconds(30);
            AtOnceJitter = TimeSpan.FromSeconds(0.25);
            ConnectTimeout = TimeSpan.FromSeconds(10);
            Heartbeat = TimeSpan.FromSeconds(15);
            CloseTimeout = TimeSpan.FromSeconds(2);
            AutoAck = true;
            MaxMessageBytes = 64 * 1024 * 1024;
        }

        /// <summary>
        /// The node or load balancer: <c>ws://host:port</c> or <c>wss://…</c>. It may also be
        /// the full <c>…/ws/{ClientId}</c> address.
        /// </summary>
        public string Url { get; set; }

        /// <summary>The client id (= the BizId events are published to): 1-128 of A-Z a-z 0-9 _ . : @ -</summary>
        public string ClientId { get; set; }

        /// <summary>
        /// Asked for a token before every connect (so also after 4500 "token expired", and
        /// once more after a 4001 "invalid token"). Null: connect without a token.
        /// </summary>
        public Func<CancellationToken, Task<string>> TokenProvider { get; set; }

        /// <summary>Where the position (the last handled id) is kept across restarts; null: memory only.</summary>
        public ICursorStore CursorStore { get; set; }

        public RelayFormat Format { get; set; }

        /// <summary>Full-jitter backoff: a reconnect waits random(0, min(BackoffMax, BackoffBase · 2^attempt)).</summary>
        public TimeSpan BackoffBase { get; set; }

        public TimeSpan BackoffMax { get; set; }

        /// <summary>Most an "at once" reconnect waits (after 1012 draining, 4500-4999), so a drained node's clients do not arrive as one herd.</summary>
        public TimeSpan AtOnceJitter { get; set; }

        /// <summary>Time for the WebSocket upgrade, and again for the welcome frame.</summary>
        public TimeSpan ConnectTimeout { get; set; }

        /// <summary>
        /// After this long without a frame from the server the client sends <c>{"type":"ping"}</c>;
        /// after twice this long it gives the connection up as dead and reconnects.
        /// <see cref="TimeSpan.Zero"/>: off (the server's own pings still keep the session).
        /// </summary>
        public TimeSpan Heartbeat { get; set; }

        /// <summary>How long a close waits for the other side's close frame before hanging up.</summary>
        public TimeSpan CloseTimeout { get; set; }

        /// <summary>Ack each message to the server once its handler returned (coalesced: at most 4 acks a second).</summary>
        public bool AutoAck { get; set; }

        /// <summary>
        /// Send the token as <c>?token=</c> instead of an <c>Authorization: Bearer</c> header.
        /// The header keeps it out of proxies' access logs; use the query only for a proxy that drops the header.
        /// </summary>
        public bool SendTokenInQuery { get; set; }

        /// <summary>Largest message accepted; a larger one ends the connection with 1009.</summary>
        public int MaxMessageBytes { get; set; }

        /// <summary>Log lines (<c>client.reconnecting client_id=… code=1012 delay=0.412</c>); null: silent.</summary>
        public Action<RelayLogLevel, string> Log { get; set; }

        internal RelayClientOptions Validated()
        {
            if (string.IsNullOrEmpty(Url))
                throw new ArgumentException("Url is required (ws://host:port or wss://…)", "options");
            Uri uri;
            if (!Uri.TryCreate(Url, UriKind.Absolute, out uri) || (uri.Scheme != "ws" && uri.Scheme != "wss"))
                throw new ArgumentException("Url must be an absolute ws:// or wss:// address", "options");
            if (!ConnectUrl.IsValidClientId(ClientId))
                throw new ArgumentException("ClientId must be 1-128 of A-Z a-z 0-9 _ . : @ -", "options");
            if (BackoffBase <= TimeSpan.Zero || BackoffMax <= TimeSpan.Zero || ConnectTimeout <= TimeSpan.Zero
                || CloseTimeout <= TimeSpan.Zero || AtOnceJitter < TimeSpan.Zero || Heartbeat < TimeSpan.Zero)
                throw new ArgumentException("backoff and timeouts must be positive", "options");
            if (MaxMessageBytes < 1024)
                throw new ArgumentException("MaxMessageBytes must be at least 1024", "options");
            return (RelayClientOptions)MemberwiseClone();
        }
    }
}
