// The part of WebSocketSharp's public API (namespace WebSocketSharp) that the
// C# example in docs/client.md uses, with the same signatures and no behaviour: the test
// compiles the documented code against it, so the example keeps building. Not a client.
using System;

namespace WebSocketSharp
{
    public enum WebSocketState : ushort { Connecting = 0, Open = 1, Closing = 2, Closed = 3 }

    public class MessageEventArgs : EventArgs
    {
        public string Data { get { return null; } }
        public byte[] RawData { get { return null; } }
        public bool IsText { get { return true; } }
        public bool IsBinary { get { return false; } }
        public bool IsPing { get { return false; } }
    }

    public class CloseEventArgs : EventArgs
    {
        public ushort Code { get { return 1005; } }
        public string Reason { get { return ""; } }
        public bool WasClean { get { return false; } }
    }

    public class ErrorEventArgs : EventArgs
    {
        public string Message { get { return ""; } }
        public Exception Exception { get { return null; } }
    }

    public class WebSocket : IDisposable
    {
        public WebSocket(string url, params string[] protocols) { }

        public event EventHandler<CloseEventArgs> OnClose;
        public event EventHandler<ErrorEventArgs> OnError;
        public event EventHandler<MessageEventArgs> OnMessage;
        public event EventHandler OnOpen;

        public WebSocketState ReadyState { get { return WebSocketState.Closed; } }
        public bool IsAlive { get { return false; } }
        public string Protocol { get { return ""; } }

        public void Connect() { }
        public void ConnectAsync() { }
        public void Close() { }
        public void Close(ushort code, string reason) { }
        public void CloseAsync() { }
        public bool Ping() { return false; }
        public void Send(string data) { }
        void IDisposable.Dispose() { }

        // Keeps the compiler quiet about events the stub never raises.
        internal void Raise()
        {
            OnClose?.Invoke(this, null);
            OnError?.Invoke(this, null);
            OnMessage?.Invoke(this, null);
            OnOpen?.Invoke(this, EventArgs.Empty);
        }
    }
}
