using System;
using System.Text;

namespace Relay.Client
{
    /// <summary>The handshake address: <c>{url}/ws/{client_id}?since=…&amp;attempt=…[&amp;token=…]</c>.</summary>
    public static class ConnectUrl
    {
        public const string SubprotocolJson = "relay.v1.json";
        public const string SubprotocolMessagePack = "relay.v1.msgpack";

        public static bool IsValidClientId(string clientId)
        {
            if (string.IsNullOrEmpty(clientId) || clientId.Length > 128)
                return false;
            foreach (char c in clientId)
            {
                bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
                          || c == '_' || c == '.' || c == ':' || c == '@' || c == '-';
                if (!ok)
                    return false;
            }
            return true;
        }

        /// <summary>
        /// <paramref name="url"/> may already end in <c>/ws/{clientId}</c>; its own query is kept.
        /// Null parts are left out.
        /// </summary>
        public static Uri Build(string url, string clientId, string since, string attempt, string token)
        {
            var builder = new UriBuilder(url);
            string path = builder.Path.TrimEnd('/');
            string tail = "/ws/" + clientId;
            if (!path.EndsWith(tail, StringComparison.Ordinal))
                path += tail;
            builder.Path = path;
            var query = new StringBuilder(builder.Query.TrimStart('?'));
            Add(query, "since", since);
            Add(query, "attempt", attempt);
            Add(query, "token", token);
            builder.Query = query.ToString();
            return builder.Uri;
        }

        private static void Add(StringBuilder query, string name, string value)
        {
            if (value == null)
                return;
            if (query.Length > 0)
                query.Append('&');
            query.Append(name).Append('=').Append(Uri.EscapeDataString(value));
        }
    }
}
